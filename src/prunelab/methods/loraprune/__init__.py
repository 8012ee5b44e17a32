from prunelab.methods.loraprune.pruner import LoRAPrune

__all__ = ["LoRAPrune"]
