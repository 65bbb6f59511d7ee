"""The paper's comparison of objectives, reproduced on one CPU from a seed; tools, not the library.

    python -m rcfd_jax.reproduce --workdir=DIR [--quick] [--parallel=N] [--seeds=S]   (run.py)
    python -m rcfd_jax.reproduce.prepare --out=build/tiny                              (prepare.py)
    python -m rcfd_jax.reproduce.frontier --workdir=DIR [--quick]                      (frontier.py)

  corpus.py    the synthetic movie-review corpus, plain and voiced regimes
  tiny.py      byte-level BPE tokenizers and random GPT-2 model directories
  prepare.py   the tiny assets (corpus, tokenizer, policy, reward model) configs/tiny.py runs on
  run.py       every stage and arm of the comparison; results.json
  runner.py    runs them side by side in worker processes
  report.py    results.md and the plots
  frontier.py  after run.py: the most diverse policies at each likelihood on the loglik tasks
"""
