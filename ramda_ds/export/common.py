"""What every export family shares: the error, the logits tolerance, the shape check, the atomic
write, the tokenizer copy and the report's text.  Below :mod:`.api` and the families
(:mod:`.txl`), so that they import it and not each other."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

RTOL = 1e-5
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class ExportError(ValueError):
    """The input cannot be exported as asked; nothing was written."""


def check_shapes(tensors: dict, params: dict) -> None:
    """ExportError naming the first tensor whose shape differs from the model's parameter."""
    for n, t in tensors.items():
        if tuple(t.shape) != tuple(params[n].shape):
            raise ExportError(f"the checkpoint is of a different model: {n} has shape "
                              f"{list(t.shape)}, the model's is {list(params[n].shape)}")


def write_atomically(out: Path, write) -> None:
    """``write(tmp)`` into a hidden temporary directory next to ``out``, renamed to ``out`` at the
    end; on any error the temporary directory goes and ``out`` does not appear."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            raise ExportError(f"output directory {out} appeared while exporting; nothing written")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_tokenizer(base_model, run_dir, dest: Path, modulo: bool = True) -> str | None:
    """The base model's HF tokenizer, else the SentencePiece model the run trained, rebuilt as
    ``tokenizer.json`` (:func:`ramda_ds.tokenization.sentencepiece_as_hf`; the ``.model`` is
    copied next to it as ``sentencepiece.model``), else None. Either way
    ``AutoTokenizer.from_pretrained(dest)`` loads what is written, without custom code."""
    if base_model and any((Path(base_model) / f).exists() for f in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(base_model).save_pretrained(dest)
        return f"from {base_model}"
    if run_dir is not None:
        sp = sorted((Path(run_dir) / "data").glob("sp*.model"))
        if sp:
            from ..tokenization import sentencepiece_as_hf

            sentencepiece_as_hf(str(sp[-1])).save_pretrained(dest)
            shutil.copy(sp[-1], dest / "sentencepiece.model")
            return (f"tokenizer.json: the SentencePiece model trained by the run ({sp[-1]})" +
                    ("; ids are taken modulo vocab_size" if modulo else ""))
    return None


def format_report(r: dict) -> str:
    lines = [f"export ({r['layout']}, weights: {r['weights']}): layer  FFN kept/total  heads "
             "kept/total  K/V  params after/before"]
    for x in r["layers"]:
        lines.append(f"  {x['layer']:3d}  {x['ffn'][0]:6d}/{x['ffn'][1]:<6d} {x['heads'][0]:3d}/"
                     f"{x['heads'][1]:<3d} {x['kv_heads'][0]:3d}/{x['kv_heads'][1]:<3d} "
                     f"{x['params'][0]:,}/{x['params'][1]:,}")
    lines.append(f"  total parameters {r['params_after']:,} / {r['params_before']:,} "
                 f"({100 * r['kept_fraction']:.1f}% kept); logits max rel diff "
                 f"{r['logits_max_rel_diff']:.1e}")
    return "\n".join(lines)
