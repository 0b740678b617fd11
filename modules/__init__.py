"""The Transformer of "Attention Is All You Need" in plain PyTorch, written next to the paper, and its training recipe
as a LightningModule; imports nothing from data/ or pipeline/."""
