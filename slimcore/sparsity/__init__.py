"""Training with the sparsity penalty: the penalties, ``sparse_bn_step`` and ``SlimBatchNorm``."""
