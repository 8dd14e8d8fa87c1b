"""``python -m benchmarks``: the same as ``optax-stab bench`` (optax_stab._bench)."""

from optax_stab import _bench

if __name__ == "__main__":
    _bench.main()
