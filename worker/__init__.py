"""Workers: pull weights, compute gradients on a data shard, push them back."""
