"""Demo task ``lm``: a small character-level transformer on Python's own docs.

The text is ``pydoc_data.topics.topics``, the help pages that ship with every
CPython (``help("assert")`` etc.), so the task is offline. Each topic's first
90% of characters goes to training (418k characters on CPython 3.11), its last
10% to the held-out set (47k), from which 32 windows at evenly spaced starts
are the fixed test set. Tokens are characters: newline and printable ASCII,
plus one id for anything else (curly quotes, accents).

The model is a decoder-only transformer as in GPT-2, at demo size (84k
parameters): 2 pre-LayerNorm blocks of causal 4-head self-attention and a GELU
MLP, width 64, learned positions, an untied output layer, and *no* QK-norm,
trained on minibatches of 4 random windows of 64 characters.

The base optimizer is ``optax.adamw(lr, b2=0.95, weight_decay=0.1)``, the
recipe of GPT-3-style language-model training (and ``b2`` of Wortsman et al.),
i.e. what a user would start from; optax couples the decay to the learning
rate, so it shrinks weights by ``lr * 0.1`` per step. With optax's defaults
(``b2=0.999``, ``weight_decay=1e-4``) the picture is the same, slightly worse
at the large learning rates.

Without QK-norm, the largest attention logit of the first layer grows with the
learning rate, from about 9 after 400 steps at ``lr=1e-3`` to 35 at ``1e-2``,
300 at ``3e-2`` and 1800 at ``1e-1`` (attention-entropy collapse, Wortsman et
al., `Small-scale proxies for large-scale Transformer training instabilities
<https://arxiv.org/abs/2309.14322>`_, 2023), and the final loss rises with
it, to the unigram baseline at ``1e-1``. There is no NaN and no loss spike to
clip: Adam normalises the gradient, so ``clip_by_global_norm`` in front of it
changes little. The default ``lr=3e-2`` is where training has clearly degraded
(about 0.35 nats/char above the best learning rate) but not yet collapsed.

Thresholds: diverged above the unigram baseline (``diverge_factor=1``: the
model did no better than ignoring the context); solved below 2.8 nats/char,
which plain AdamW reaches at ``lr`` 1e-3 to 3e-3 in the 400 steps (about 2.65;
a count-based bigram model gets 2.61 on the test windows, the unigram 3.29).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

if TYPE_CHECKING:
    from optax_stab.demo import tasks

#: Token id of every character outside the vocabulary (e.g. curly quotes).
UNKNOWN = 0
#: Characters with their own token id, from 1: newline and printable ASCII.
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB = len(CHARS) + 1
_CHAR_IDS = {c: i + 1 for i, c in enumerate(CHARS)}

#: Fraction of each topic held out (its end) for the test loss.
HELD_OUT = 0.1

CONTEXT = 64
_WIDTH = 64
_LAYERS = 2
_HEADS = 4
_MLP = 2  # MLP width / model width (GPT-2 has 4; 2 keeps the demo cheap on CPU)
_BATCH = 4
TEST_WINDOWS = 32


def encode(text: str) -> np.ndarray:
    """Token ids (``uint8``) of ``text``; characters outside :data:`CHARS` map to
    :data:`UNKNOWN`."""
    return np.fromiter((_CHAR_IDS.get(c, UNKNOWN) for c in text), np.uint8, len(text))


def decode(ids: np.ndarray) -> str:
    """Text of token ids; :data:`UNKNOWN` becomes ``"?"``."""
    table = "?" + CHARS
    return "".join(table[int(i)] for i in ids)


def split_topics(topics: dict[str, str]) -> tuple[list[str], list[str]]:
    """Per topic (sorted keys), the first 90% of characters and the last 10%.

    Args:
        topics: Topic name to text.

    Returns:
        ``(train, held_out)`` lists of strings; ``train[i] + held_out[i]`` is
        the ``i``-th topic and ``len(held_out[i]) == round(0.1 * len(topic))``.
    """
    train, held_out = [], []
    for key in sorted(topics):
        text = topics[key]
        cut = len(text) - round(HELD_OUT * len(text))
        train.append(text[:cut])
        held_out.append(text[cut:])
    return train, held_out


def split_text() -> tuple[str, str]:
    """``(train, held_out)`` text of ``pydoc_data.topics``: :func:`split_topics`
    with the pieces joined by newlines."""
    from pydoc_data.topics import topics

    train, held_out = split_topics(topics)
    return "\n".join(train), "\n".join(held_out)


def unigram_cross_entropy(train_ids: np.ndarray, test_ids: np.ndarray) -> float:
    """Cross-entropy (nats/char) on ``test_ids`` of the training text's character
    frequencies, add-one smoothed over :data:`VOCAB`: the best constant
    predictor."""
    counts = np.bincount(train_ids, minlength=VOCAB) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(-np.mean(log_p[test_ids]))


def held_out_windows(held_out_ids: np.ndarray, n: int = TEST_WINDOWS) -> np.ndarray:
    """``[n, CONTEXT + 1]`` windows of the held-out ids at evenly spaced starts."""
    starts = np.linspace(0, len(held_out_ids) - CONTEXT - 1, n).astype(np.int64)
    return held_out_ids[starts[:, None] + np.arange(CONTEXT + 1)]


def sample_windows(key: jax.Array, ids: jax.Array, batch: int) -> jax.Array:
    """``[batch, CONTEXT + 1]`` int32 windows of ``ids`` at uniform random starts."""
    starts = jax.random.randint(key, (batch,), 0, ids.shape[0] - CONTEXT)
    return ids[starts[:, None] + jnp.arange(CONTEXT + 1)].astype(jnp.int32)


class _Block(nn.Module):
    """Pre-LN block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``."""

    width: int
    heads: int
    mlp: int

    @nn.compact
    def __call__(self, x: jax.Array, _=None) -> tuple[jax.Array, None]:
        t, head_dim = x.shape[-2], self.width // self.heads
        qkv = nn.Dense(3 * self.width, name="qkv")(nn.LayerNorm()(x))
        q, k, v = jnp.split(qkv.reshape(*x.shape[:-1], 3 * self.heads, head_dim), 3, -2)
        logits = jnp.einsum("...qhd,...khd->...hqk", q, k) / np.sqrt(head_dim)
        causal = jnp.tril(jnp.ones((t, t), bool))
        logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
        att = jnp.einsum("...hqk,...khd->...qhd", jax.nn.softmax(logits), v)
        x = x + nn.Dense(self.width, name="out")(att.reshape(x.shape))
        h = nn.gelu(nn.Dense(self.mlp * self.width, name="up")(nn.LayerNorm()(x)))
        return x + nn.Dense(self.width, name="down")(h), None


class CharTransformer(nn.Module):
    """Decoder-only character transformer: ``[..., T]`` ids to ``[..., T, VOCAB]``
    next-character logits.

    The ``layers`` blocks are one ``nn.scan``, so their parameters are stacked
    ``[layers, ...]`` (fewer leaves, faster compile; per-leaf transforms see
    each stack as one leaf).
    """

    width: int = _WIDTH
    layers: int = _LAYERS
    heads: int = _HEADS
    mlp: int = _MLP
    context: int = CONTEXT

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        x = nn.Embed(VOCAB, self.width, embedding_init=nn.initializers.normal(0.02))(
            ids
        )
        pos = self.param(
            "pos", nn.initializers.normal(0.02), (self.context, self.width)
        )
        x = x + pos[: ids.shape[-1]]
        blocks = nn.scan(
            _Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.layers,
        )(self.width, self.heads, self.mlp)
        x, _ = blocks(x, None)
        return nn.Dense(VOCAB, use_bias=False, name="head")(nn.LayerNorm()(x))


def _adamw(lr: float) -> optax.GradientTransformation:
    return optax.adamw(lr, b2=0.95, weight_decay=0.1)


def lm_task() -> tasks.Task:
    """Builds the ``lm`` task (registered in :mod:`optax_stab.demo.tasks`)."""
    from optax_stab.demo import tasks  # tasks imports this module

    train_text, held_out_text = split_text()
    train_np, held_np = encode(train_text), encode(held_out_text)
    windows = held_out_windows(held_np)
    baseline = unigram_cross_entropy(train_np, windows[:, 1:].ravel())
    train_ids = jnp.asarray(train_np)
    x_te = jnp.asarray(windows[:, :-1], jnp.int32)
    y_te = jnp.asarray(windows[:, 1:], jnp.int32)
    model = CharTransformer()

    def xent(params, window):
        logits = model.apply(params, window[..., :-1])
        labels = window[..., 1:]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    def evaluate(params):
        logits = model.apply(params, x_te)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y_te)
        return jnp.mean(loss), jnp.mean(jnp.argmax(logits, -1) == y_te)

    return tasks.Task(
        name="lm",
        title=(
            f"Python docs (pydoc_data), characters: {_LAYERS}-layer transformer "
            f"(width {_WIDTH}, {_HEADS} heads, no QK-norm), context {CONTEXT}, "
            f"batch {_BATCH}"
        ),
        optimizer="adamw(b2=0.95, weight_decay=0.1)",
        make_optimizer=_adamw,
        lr=0.03,
        steps=400,
        quick_steps=200,
        clip_norm=1.0,
        sign_threshold=0.01,
        init=lambda key: model.init(key, x_te[:1]),
        sample=lambda key: sample_windows(key, train_ids, _BATCH),
        loss=xent,
        evaluate=evaluate,
        metric="test next-character accuracy",
        baseline=baseline,
        solved_loss=2.8,
        solved_text=(
            f"test cross-entropy < 2.8 nats/char on {TEST_WINDOWS} held-out "
            f"windows of {CONTEXT} characters (the unigram baseline is "
            f"{baseline:.2f})"
        ),
        diverge_factor=1.0,
        sweep_lrs=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    )
