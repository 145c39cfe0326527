"""Comparing representations and features: rep_similarity, feature families, pair labels and
SAE steering (the CCA/CKA, feature-splitting and steering experiments of seed 003)."""
