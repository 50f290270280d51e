"""How a Model's engines hash their prefix-cache blocks, read from the Model: what the picker's
`--kv-index-keys engine` needs to hash prompts alike (kvindex/engine_hashing.py). Shared, since
the controllers pass it to a cluster's pickers and `infergate up` to its own, and neither
imports the other.

vLLM (0.32): `--block-size` (default 16 on GPUs; its CPU build picks 128 when unset, which the
picker then reports as a block-size mismatch), `--prefix-caching-hash-algo` (default sha256)
and the root seeded from `PYTHONHASHSEED` when the pods set it (sha256 and sha256_cbor root in a
fixed string without it; the xxhash ones draw a random root, so they need it). The simulator
hashes alike with its `--seed` (default 0) in place of `PYTHONHASHSEED` and the two sha256
algorithms. Other engines (SGLang, TRT-LLM) hash otherwise: they keep token-id keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from infergw.api.engines import VLLM, runs_simulator
from infergw.api.workload import Model, engine_type

TOKEN_KEYS = "tokens"  # the index's own keys (token ids): needs nothing of the engines
ENGINE_KEYS = "engine"  # the engines' block hashes
INDEX_KEYS = (TOKEN_KEYS, ENGINE_KEYS)

# vLLM 0.32's `--prefix-caching-hash-algo` choices the picker reproduces, its default, and those
# whose root is random unless PYTHONHASHSEED is set.
HASH_ALGOS = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
DEFAULT_HASH_ALGO = "sha256"
SEEDED_ONLY_ALGOS = frozenset({"xxhash", "xxhash_cbor"})
SIMULATOR_HASH_ALGOS = ("sha256", "sha256_cbor")  # simulator/block_hashing.py's
DEFAULT_BLOCK_SIZE = 16  # vLLM's on GPUs, the simulator's
SIMULATOR_DEFAULT_SEED = "0"  # the simulator's --seed default (simulator/config.py)
HASH_SEED_ENV = "PYTHONHASHSEED"


@dataclass(frozen=True, slots=True)
class EngineHashSettings:
    """The engines' block size, hash algorithm and root seed (None: unset)."""

    block_size: int
    algo: str
    seed: str | None

    def picker_args(self) -> list[str]:
        """The picker's flags for these engines (epp/options.py)."""
        seed = [] if self.seed is None else [f"--kv-engine-hash-seed={self.seed}"]
        return [
            f"--kv-index-keys={ENGINE_KEYS}",
            f"--kv-index-block-size={self.block_size}",
            f"--kv-engine-hash-algo={self.algo}",
            *seed,
        ]


@dataclass(frozen=True, slots=True)
class NotReproducible:
    """Why the picker cannot hash as the Model's engines do: it keeps token-id keys."""

    reason: str


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value `args` give `flag` (`--flag V` or `--flag=V`; the last one wins, as argparse
    reads it), else None."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.partition("=")[2]
    return value


def _roles_args(model: Model) -> list[list[str]]:
    """Each role's engine arguments (the Model's, then the role's), as its pods get them."""
    backend = model.spec.backend
    roles = [r for r in (backend.aggregated, backend.prefill, backend.decode) if r is not None]
    own = list(model.spec.engine.args or [])
    return [[*own, *(r.args or [])] for r in roles] or [own]


def settings_of(
    engine: str, image: str, roles_args: Iterable[Sequence[str]], env: dict[str, str | None]
) -> EngineHashSettings | NotReproducible:
    """The hashing of engines of this type and image started with these arguments (one list
    per role: all must agree) and environment (None: a value the Model takes from a reference,
    which only the kubelet reads)."""
    simulator = runs_simulator(engine, image)
    if not simulator and engine != VLLM:
        return NotReproducible(f"{engine} does not hash blocks as vLLM does")
    found = set()
    for args in roles_args:
        block = flag_value(args, "--block-size")
        algo = flag_value(args, "--prefix-caching-hash-algo") or DEFAULT_HASH_ALGO
        seed = (flag_value(args, "--seed") or SIMULATOR_DEFAULT_SEED) if simulator else None
        found.add((block, algo, seed))
    if len(found) > 1:
        return NotReproducible("its roles hash blocks differently (--block-size, hash algorithm)")
    [(block, algo, seed)] = found
    if block is None:
        block_size = DEFAULT_BLOCK_SIZE
    elif block.isdigit() and int(block) > 0:
        block_size = int(block)
    else:
        return NotReproducible(f"--block-size {block!r} is not a positive number")
    known = SIMULATOR_HASH_ALGOS if simulator else HASH_ALGOS
    if algo not in known:
        return NotReproducible(
            f"--prefix-caching-hash-algo {algo!r} is not one the picker reproduces "
            f"({', '.join(known)})"
        )
    if not simulator:
        if HASH_SEED_ENV in env and env[HASH_SEED_ENV] is None:
            return NotReproducible(f"{HASH_SEED_ENV} comes from a reference the picker cannot read")
        seed = env.get(HASH_SEED_ENV)
        if seed is None and algo in SEEDED_ONLY_ALGOS:
            return NotReproducible(
                f"{algo} without {HASH_SEED_ENV} gives every engine a random root: set it"
            )
    return EngineHashSettings(block_size, algo, seed)


def engine_hash_settings(model: Model) -> EngineHashSettings | NotReproducible:
    """How the Model's pods hash blocks, or why the picker cannot tell."""
    env = {e.name: (e.value or "") if e.value_from is None else None for e in model.spec.env or []}
    return settings_of(engine_type(model), model.spec.image, _roles_args(model), env)
