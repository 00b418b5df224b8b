"""Networks: the DiT backbone, the soft-mask input module, and the heads of each family."""
