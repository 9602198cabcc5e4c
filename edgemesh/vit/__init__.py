"""ED-ViT: a small vision transformer, structured pruning, class-subset splits and their fusion
(pure torch, no networking)."""
