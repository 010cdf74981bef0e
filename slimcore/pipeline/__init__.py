"""The train → prune → fine-tune pipeline: data, training, plots and the ``slimcore`` CLI."""
