from prunelab.methods.structured.pruner import StructuredPruner

__all__ = ["StructuredPruner"]
