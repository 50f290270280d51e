"""Build simulator/default_model/: a small byte-level BPE tokenizer trained on Python's stdlib.

Run from the repository root: ``python -m infergw.simulator.tools.build_default_model``.
The output is deterministic for a given Python version (sorted inputs, fixed caps), and the
generated files are committed, so the simulator never needs to download a tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 8192
MAX_FILES = 500
MAX_FILE_BYTES = 200_000  # skip giant generated modules; they skew merges and slow training
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2, like Llama
OUT_DIR = Path(__file__).resolve().parent.parent / "default_model"
EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "encodings", "__pycache__"}

# Llama-3-like headers; BOS is in the template, so chat prompts are encoded without special tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in root.rglob("*.py")
        if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])
        and p.stat().st_size <= MAX_FILE_BYTES
    ]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return files[:MAX_FILES]


def iter_texts(files: list[Path]) -> Iterator[str]:
    for path in files:
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def build_tokenizer(files: list[Path]) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk>
        show_progress=False,
    )
    tok.train_from_iterator(iter_texts(files), trainer=trainer)
    bos = tok.token_to_id("<s>")
    # Like Llama: <s> before each sequence when add_special_tokens=True.
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", bos)]
    )
    return tok


def write_model(tok: Tokenizer, out: Path, n_files: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    config = {
        "_generated_by": "simulator/tools/build_default_model.py",
        "_training_data": f"first {n_files} .py files of the Python standard library",
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "max_position_embeddings": 4096,
        "bos_token_id": tok.token_to_id("<s>"),
        "eos_token_id": tok.token_to_id("</s>"),
    }
    for name, data in (("tokenizer_config.json", tokenizer_config), ("config.json", config)):
        (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    files = stdlib_files()
    tok = build_tokenizer(files)
    write_model(tok, args.out, len(files))
    size = (args.out / "tokenizer.json").stat().st_size
    print(f"trained on {len(files)} files; wrote {args.out} (tokenizer.json {size // 1024} KB)")


if __name__ == "__main__":
    main()
