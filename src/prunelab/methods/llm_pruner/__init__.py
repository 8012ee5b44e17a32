from prunelab.methods.llm_pruner.pruner import LLMPruner

__all__ = ["LLMPruner"]
