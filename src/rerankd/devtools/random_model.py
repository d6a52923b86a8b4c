"""Write a random-weight reranker folder at a catalog geometry, for tests and benchmarks.

No real weights are needed to measure speed, memory or fidelity to the reference: those depend on the geometry
and the tokenizer, not on what the weights learned. The folder is marked untrained in its config
(`rerankd_untrained`) and the server warns when it serves one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rerankd.catalog import CATALOG, UNTRAINED_KEY, deberta_v3_config
from rerankd.devtools.train_tokenizer import train_unigram_tokenizer

TOKENIZER_FILES = (
    "tokenizer.json",
    "spm.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def random_checkpoint(config: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors under the transformers names of `DebertaV2ForSequenceClassification`, normally initialized."""
    generator = torch.Generator().manual_seed(seed)
    std = float(config["initializer_range"])
    hidden, inner = config["hidden_size"], config["intermediate_size"]

    def normal(*shape: int, mean: float = 0.0, scale: float = std) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale + mean).to(dtype)

    def layer_norm(prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": normal(hidden, mean=1.0, scale=0.1), f"{prefix}.bias": normal(hidden)}

    def linear(prefix: str, out_features: int, in_features: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": normal(out_features, in_features), f"{prefix}.bias": normal(out_features)}

    tensors = {
        "deberta.embeddings.word_embeddings.weight": normal(config["vocab_size"], hidden),
        **layer_norm("deberta.embeddings.LayerNorm"),
        "deberta.encoder.rel_embeddings.weight": normal(2 * config["position_buckets"], hidden),
        **layer_norm("deberta.encoder.LayerNorm"),
    }
    for index in range(config["num_hidden_layers"]):
        prefix = f"deberta.encoder.layer.{index}"
        for projection in ("query_proj", "key_proj", "value_proj"):
            tensors.update(linear(f"{prefix}.attention.self.{projection}", hidden, hidden))
        tensors.update(linear(f"{prefix}.attention.output.dense", hidden, hidden))
        tensors.update(layer_norm(f"{prefix}.attention.output.LayerNorm"))
        tensors.update(linear(f"{prefix}.intermediate.dense", inner, hidden))
        tensors.update(linear(f"{prefix}.output.dense", hidden, inner))
        tensors.update(layer_norm(f"{prefix}.output.LayerNorm"))
    tensors.update(linear("pooler.dense", hidden, hidden))
    tensors.update(linear("classifier", len(config["id2label"]), hidden))
    return tensors


def write_random_model(
    out_dir: Path,
    geometry: str = "base",
    tokenizer_dir: Path | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    num_labels: int = 1,
    init_std: float | None = None,
) -> Path:
    """Create `out_dir` with config.json, model.safetensors and tokenizer files; returns `out_dir`.

    `tokenizer_dir` supplies the real tokenizer files (e.g. the DeBERTa-v3 tokenizer); without it a small
    SentencePiece unigram tokenizer is trained on the spot, and the vocabulary shrinks to match it.
    `init_std` widens the initialization (default: the config's 0.02), which spreads the scores of different
    documents apart, as trained models do, so that ranking comparisons between variants mean something.
    """
    if geometry not in CATALOG:
        raise ValueError(f"unknown geometry {geometry!r}; known: {sorted(CATALOG)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, out_dir / name)
        vocab_size = 128100
    else:
        train_unigram_tokenizer(out_dir)
        added = json.loads((out_dir / "added_tokens.json").read_text())
        vocab_size = max(added.values()) + 1

    config = deberta_v3_config(CATALOG[geometry].geometry, vocab_size=vocab_size)
    if num_labels == 2:
        config["id2label"] = {"0": "LABEL_0", "1": "LABEL_1"}
        config["label2id"] = {"LABEL_0": 0, "LABEL_1": 1}
    config["_name_or_path"] = f"rerankd-random/{geometry}"
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config[UNTRAINED_KEY] = True
    if init_std is not None:
        config["initializer_range"] = init_std
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    checkpoint = out_dir / "model.safetensors"
    save_file(random_checkpoint(config, seed, dtype), str(checkpoint), metadata={"format": "pt"})
    # safetensors creates the file 0600; a model folder mounted into a container (uid 1000) must be readable.
    checkpoint.chmod(checkpoint.parent.joinpath("config.json").stat().st_mode & 0o777)
    return out_dir


def spread_scores(folder: Path, low: float = 0.05, high: float = 0.95) -> Path:
    """Fit the classifier of the one-label model in `folder` so that its scores of the model card's validation
    pairs are evenly spaced from `low` to `high`, in the order the random network already ranks them: as a
    trained reranker's are, spread and apart. Returns `folder`.

    A random model scores every pair near one value, its documents apart by about what bf16 or int8 moves a
    score: there a precision's drift flips a case's top document by chance, and a float32 change of 1e-6
    flips it back. Rescaling the classifier cannot help (it scales the gaps and the drift alike); a
    classifier fitted to the pooled features (least squares, float64, pairs the cases repeat fitted once)
    weighs the directions in which the documents differ, and puts each case's top document ahead of the next
    by several times any precision's drift (docs/decisions.md)."""
    from rerankd.backends.registry import load_backend, plan_backend
    from rerankd.backends.torch_backend import TorchBackend
    from rerankd.engine.precision import case_scores, reference_pairs
    from rerankd.engine.tokenize import PairTokenizer
    from rerankd.fidelity import builtin_cases
    from rerankd.settings import RuntimeSettings

    backend = load_backend(plan_backend(folder, RuntimeSettings(device="cpu", dtype="float32")))
    if not isinstance(backend, TorchBackend):
        raise ValueError(f"{folder}: spreading scores needs a model the torch backend serves")
    classifier = backend.model.to(torch.float64).get_submodule("classifier")
    if not isinstance(classifier, torch.nn.Linear) or classifier.out_features != 1:
        raise ValueError(f"{folder}: spreading scores needs a one-label classifier")
    pooled: list[torch.Tensor] = []
    hook = classifier.register_forward_hook(lambda _module, inputs, _output: pooled.append(inputs[0]))
    with torch.inference_mode():
        scores = case_scores(
            backend, PairTokenizer(backend.tokenizer, backend.info.max_length), builtin_cases()
        )
    hook.remove()
    pairs = reference_pairs()  # in the order case_scores scored them
    network_scores = dict(zip(pairs, (score for group in scores for score in group), strict=True))
    ranked = sorted(network_scores, key=network_scores.__getitem__)
    low_logit, high_logit = torch.tensor([low, high], dtype=torch.float64).logit().tolist()
    step = (high_logit - low_logit) / (len(ranked) - 1)
    targets = torch.tensor([low_logit + step * ranked.index(pair) for pair in pairs], dtype=torch.float64)
    features = torch.cat([torch.cat(pooled), torch.ones(len(pairs), 1, dtype=torch.float64)], dim=1)
    fitted = torch.linalg.pinv(features) @ targets  # the least-norm exact fit: more unknowns than pairs
    checkpoint = folder / "model.safetensors"
    tensors = load_file(str(checkpoint))
    weight, bias = tensors["classifier.weight"], tensors["classifier.bias"]
    tensors["classifier.weight"] = fitted[:-1].view_as(weight).to(weight.dtype)
    tensors["classifier.bias"] = fitted[-1:].to(bias.dtype)
    save_file(tensors, str(checkpoint), metadata={"format": "pt"})
    return folder
