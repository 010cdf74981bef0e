"""The inference form of a slimmed model: BN folding and ``slimcore.deploy``."""
