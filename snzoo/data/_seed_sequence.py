"""The per-sample seeds of SeededAugmentation for a whole epoch at once: numpy's SeedSequence, vectorised over index.

SeededAugmentation seeds sample `index` of `epoch` with the first two words of
``np.random.SeedSequence([seed, epoch, index]).generate_state(2)``; building one SeedSequence costs about 20 us,
about a quarter of what transforming a Fashion-MNIST image does. SeedSequence's hash (O'Neill's improved seed_seq, as
numpy's bit_generator.pyx implements it, fixed so that seeds stay reproducible) runs here on arrays of indices,
with numpy's uint32 wrap-around arithmetic, so the seeds of all samples of an epoch cost about as much as a few
SeedSequences.
"""

from __future__ import annotations

import numpy as np

_POOL_SIZE = 4
_INIT_A, _MULT_A = 0x43B0D7E5, 0x931E8875
_INIT_B, _MULT_B = 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R = 0xCA01F9DD, 0x4973F715
_XSHIFT = 16
_MASK32 = 0xFFFFFFFF


def _words(value: int) -> list[int]:
    """An entropy integer as SeedSequence reads it: 32-bit words, least significant first ([0] for 0)."""
    words = []
    while True:
        words.append(value & _MASK32)
        value >>= 32
        if not value:
            return words


class _Hash:
    """hashmix with its running constant; the constant's sequence does not depend on the values hashed."""

    def __init__(self, start: int) -> None:
        self.const = start

    def __call__(self, value):
        value = value ^ np.uint32(self.const)
        self.const = (self.const * _MULT_A) & _MASK32
        value = value * np.uint32(self.const)
        return value ^ (value >> np.uint32(_XSHIFT))


def _mix(x, y):
    result = np.uint32(_MIX_MULT_L) * x - np.uint32(_MIX_MULT_R) * y
    return result ^ (result >> np.uint32(_XSHIFT))


def sample_seeds(seed: int, epoch: int, count: int) -> np.ndarray:
    """The uint64 seeds ``words[0] << 32 | words[1]`` of SeedSequence([seed, epoch, i]) for i in range(count)."""
    if seed < 0 or epoch < 0 or count >= 2**32:
        raise ValueError(f"seed {seed} and epoch {epoch} must be >= 0 and count {count} below 2**32")
    index = np.arange(count, dtype=np.uint32)
    # One-element arrays, not numpy scalars: array arithmetic wraps around silently, scalar arithmetic warns.
    entropy = [np.array([w], dtype=np.uint32) for w in _words(seed) + _words(epoch)] + [index]
    hashmix = _Hash(_INIT_A)
    pool = [hashmix(entropy[i] if i < len(entropy) else np.zeros(1, dtype=np.uint32)) for i in range(_POOL_SIZE)]
    for src in range(_POOL_SIZE):
        for dst in range(_POOL_SIZE):
            if src != dst:
                pool[dst] = _mix(pool[dst], hashmix(pool[src]))
    for src in range(_POOL_SIZE, len(entropy)):
        for dst in range(_POOL_SIZE):
            pool[dst] = _mix(pool[dst], hashmix(entropy[src]))
    const, state = _INIT_B, []
    for word in pool[:2]:  # generate_state(2) takes the pool's first two words
        value = word ^ np.uint32(const)
        const = (const * _MULT_B) & _MASK32
        value = value * np.uint32(const)
        state.append(np.broadcast_to(value ^ (value >> np.uint32(_XSHIFT)), (count,)).astype(np.uint64))
    return (state[0] << np.uint64(32)) | state[1]
