"""Multi-query associative recall (Zoology, arXiv:2312.04927) with any model preset.

    python -m hybrid_jax.train --config=configs/mqar.py:model=taipan,size=tiny,seq_len=64,kv=4 --workdir=/tmp/mqar

Knobs: ``model`` (a preset: transformer, transformer_swa, mamba, mamba2, samba, taipan, jamba), ``size``, ``seq_len``
(L), ``kv`` (K key-value pairs), ``vocab`` (V), ``num_train`` (examples per epoch), ``steps``, ``lr``. The loss and
the reported accuracy count only the answer positions (Zoology's protocol); ``exact_match`` is the fraction of test
sequences with every answer right. Attention windows (SWA, SAL) are widened to L so that every model can reach every
key. Model and kernels fields are documented in hybrid_jax/model/config.py, the other sections in
hybrid_jax/training/config.py (preset_config).
"""

from hybrid_jax.training import parse_arg, preset_config


def get_config(arg=None):
    args = parse_arg(
        arg, model="taipan", size="tiny", seq_len=64, kv=4, vocab=8192, num_train=100_000, steps=1000, lr=1e-3
    )
    config = preset_config(args.model, args.size)
    # Examples made on the fly from (seed, split, index), the same as a prepared TFDS copy would hold.
    config.data.source = (
        f"mqar?seq_len={args.seq_len}&num_kv_pairs={args.kv}&vocab_size={args.vocab}"
        f"&num_train={args.num_train}&num_eval=1000&prepare=false"
    )
    config.data.seq_len = args.seq_len  # rows are exactly one example
    config.data.batch_size = 64  # Zoology's batch size
    config.model.attention.window = max(config.model.attention.window, args.seq_len)
    config.model.sal.window = max(config.model.sal.window, args.seq_len)
    config.optim.learning_rate = args.lr
    config.optim.warmup_steps = args.steps // 10
    config.optim.min_learning_rate = 0.0
    config.train.steps = args.steps
    config.train.eval_every = max(args.steps // 5, 1)
    config.train.checkpoint_every = max(args.steps // 5, 1)
    config.eval.batch_size = 64
    config.eval.max_batches = 16  # 1000 test examples
    config.eval.sample_tokens = 0  # token ids, not text
    return config
