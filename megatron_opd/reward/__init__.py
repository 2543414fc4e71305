"""The reward and the loss: per-token rewards, the vocab-parallel ops behind them, divergences."""
