"""Element-wise (unstructured and N:M) sparsity: patterns and exact masks, the per-layer
solvers of the layer-wise methods, and the block-by-block calibration engine."""
