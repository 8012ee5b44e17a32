from prunelab.methods.layerwise.pruner import ADMM, LayerwisePruner, Magnitude, SparseGPT, Wanda

__all__ = ["ADMM", "LayerwisePruner", "Magnitude", "SparseGPT", "Wanda"]
