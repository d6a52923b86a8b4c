"""GGUFs written by llama.cpp's own `convert_hf_to_gguf.py` (from llama-cpp-python's sdist, which
`make install-test` puts in the venv), for the tests and benchmarks that serve what that converter makes.

The converter names a WordPiece or BPE vocabulary's pre-tokenizer by hashing the ids it gives for one fixed
text, so it refuses any vocabulary but the published ones (NotImplementedError). A tokenizer trained here gets
the name its family's published one gets; everything else is the converter's own.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

CONVERTER = Path(sys.prefix) / "share" / "llama.cpp" / "convert_hf_to_gguf.py"
# The pre-tokenizer name the converter gives each family's published tokenizer: BAAI/bge-small's for BERT,
# whose WordPiece llama.cpp tokenizes without one; llama.cpp's "default" for XLM-R, whose SentencePiece
# model is not hashed.
PRE_TOKENIZERS = {"bert": "bert-bge", "xlm-roberta": "default", "modernbert": "modern-bert"}

_CONVERT = """
import sys
from pathlib import Path

converter, pre_tokenizer = Path(sys.argv[1]), sys.argv[2]
sys.path.insert(0, str(converter.parent))
sys.argv = [str(converter), *sys.argv[3:]]
import convert_hf_to_gguf
from conversion.base import TextModel

TextModel.get_vocab_base_pre = lambda self, tokenizer: pre_tokenizer
convert_hf_to_gguf.main()
"""


class ConversionError(RuntimeError):
    pass


def convert_to_gguf(folder: Path, family: str, out_dir: Path, converter: Path = CONVERTER) -> Path:
    """The F32 GGUF the converter writes for `folder`, in `out_dir` beside the folder's tokenizer.json (the
    llama.cpp backend reads its tokenizer from there). Each conversion is a process of its own: the converter
    imports its own copy of the gguf package."""
    if not converter.is_file():
        raise ConversionError(
            f"llama.cpp's converter is not at {converter} (make install-test puts it there)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{folder.name}.F32.gguf"
    arguments = [
        str(converter),
        PRE_TOKENIZERS[family],
        str(folder),
        "--outtype",
        "f32",
        "--outfile",
        str(path),
    ]
    result = subprocess.run(
        [sys.executable, "-c", _CONVERT, *arguments], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise ConversionError(f"converting {folder} failed: {result.stderr[-3000:]}")
    shutil.copy(folder / "tokenizer.json", out_dir)
    return path
