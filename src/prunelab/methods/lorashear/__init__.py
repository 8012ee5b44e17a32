"""LoRAShear (Chen et al. 2023) — built part by part (issue 6); see knowledge.py."""
