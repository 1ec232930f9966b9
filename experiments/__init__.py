"""
Benchmarks and experiments: measurements around MedSora, not parts of it. Each runs from the project root:

    python -m experiments.benchmark --train-step --peer      # speed and memory against attention (docs/performance.md)
    python -m experiments.throughput --end-to-end --vae VAE   # train.py end to end, and the flow alignment's cost
    python -m experiments.curve                              # a learning curve: VAE, MedSora, FVD at points
    python -m experiments.tradeoff --ckpt CKPT               # the samplers' speed against quality
    python -m experiments.peer                               # the attention peer's parameter counts

measure.py and runs.py are their shared libraries; peer.py is the attention model they compare with.
"""
