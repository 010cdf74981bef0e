"""Small helpers on nn.Module trees shared across slimcore."""

import contextlib


@contextlib.contextmanager
def eval_mode(model):
    """Every submodule in eval mode inside the block; afterwards each gets back its own mode.
    (``model.train(was_training)`` would also flip the submodules a user had put in eval mode on
    purpose, such as frozen BatchNorms.) Free when the model is already in eval mode."""
    training = [m for m in model.modules() if m.training]
    if training:
        model.eval()  # through train(False), so subclasses' overrides see the switch
    try:
        yield model
    finally:
        for m in training:
            m.training = True


def parent_module(model, name):
    """(parent module, attribute name) of the submodule called ``name``."""
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr
