"""The CPU peer of `tessera bench embed`: the same BERT forward in NumPy (its BLAS does the matmuls).

Reads one JSON object on stdin: {"safetensors": path, "config": path, "sentences": [[token id, ...], ...],
"batch_sizes": [1, 32], "samples": n}. Writes one JSON object on stdout: the
NumPy version and BLAS, sentences/s per batch size (median of the samples), the embeddings at the
largest batch size (for the caller's agreement check) and this process's peak RSS.
Run by the tessera binary with `python3 -c`; it needs only NumPy.
"""

import json
import resource
import struct
import sys
import time

import numpy as np


def load_safetensors(path):
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        data = f.read()
    tensors = {}
    for name, meta in header.items():
        # Weights are F32; other entries (such as BERT's I64 `position_ids` buffer) are not used.
        if name == "__metadata__" or meta["dtype"] != "F32":
            continue
        start, end = meta["data_offsets"]
        tensors[name] = np.frombuffer(data, dtype="<f4", count=(end - start) // 4, offset=start).reshape(meta["shape"])
    return tensors


def erf(x):
    # Abramowitz and Stegun 7.1.26 (|error| < 1.5e-7), vectorised: NumPy has no erf of its own.
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def layer_norm(x, weight, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(axis=-1, keepdims=True)
    return centred / np.sqrt(var + eps) * weight + bias


class Bert:
    def __init__(self, weights, config):
        self.w = weights
        self.heads = config["num_attention_heads"]
        self.layers = config["num_hidden_layers"]
        self.eps = config["layer_norm_eps"]
        # Weights transposed once, as a real deployment would keep them.
        self.t = {name: np.ascontiguousarray(w.T) for name, w in weights.items() if w.ndim == 2 and ".layer." in name}

    def embed(self, sentences):
        """L2-normalised mean-pooled embeddings of token-id lists, padded into one batch."""
        w, t = self.w, self.t
        batch, seq = len(sentences), max(len(s) for s in sentences)
        ids = np.zeros((batch, seq), dtype=np.int64)
        mask = np.zeros((batch, seq), dtype=np.float32)
        for i, s in enumerate(sentences):
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1.0
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:seq] + w["embeddings.token_type_embeddings.weight"][0]
        x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps)
        hidden = x.shape[-1]
        head_dim = hidden // self.heads
        # Padding keys get -inf-like scores: [batch, 1, 1, seq].
        key_bias = ((1.0 - mask) * -1e30)[:, None, None, :]
        for l in range(self.layers):
            p = f"encoder.layer.{l}."
            linear = lambda v, name: v @ t[p + name + ".weight"] + w[p + name + ".bias"]
            split = lambda v: v.reshape(batch, seq, self.heads, head_dim).transpose(0, 2, 1, 3)
            q = split(linear(x, "attention.self.query"))
            k = split(linear(x, "attention.self.key"))
            v = split(linear(x, "attention.self.value"))
            scores = q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(head_dim)) + key_bias
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)
            attended = (scores @ v).transpose(0, 2, 1, 3).reshape(batch, seq, hidden)
            x = layer_norm(linear(attended, "attention.output.dense") + x, w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], self.eps)
            inner = linear(x, "intermediate.dense")
            inner = 0.5 * inner * (1.0 + erf(inner / np.float32(np.sqrt(2.0))))
            x = layer_norm(linear(inner, "output.dense") + x, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], self.eps)
        pooled = (x * mask[:, :, None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
        return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def sentences_per_second(model, sentences, batch_size, samples):
    """The median over `samples` timed passes over every sentence, `batch_size` at a time, as the caller times its own."""
    model.embed(sentences[:batch_size])  # warm-up
    rates = []
    for _ in range(samples):
        start = time.perf_counter()
        for first in range(0, len(sentences), batch_size):
            model.embed(sentences[first : first + batch_size])
        rates.append(len(sentences) / (time.perf_counter() - start))
    rates.sort()
    middle = len(rates) // 2
    return rates[middle] if len(rates) % 2 else (rates[middle - 1] + rates[middle]) / 2


def blas_name():
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # older NumPy: no dict mode
        return "unknown"


def main():
    request = json.load(sys.stdin)
    with open(request["config"]) as f:
        config = json.load(f)
    model = Bert(load_safetensors(request["safetensors"]), config)
    sentences = request["sentences"]
    rates = {
        str(b): sentences_per_second(model, sentences, b, request["samples"])
        for b in request["batch_sizes"]
    }
    largest = max(request["batch_sizes"])
    embeddings = np.concatenate([model.embed(sentences[s : s + largest]) for s in range(0, len(sentences), largest)])
    json.dump(
        {
            "numpy": np.__version__,
            "blas": blas_name(),
            "sentences_per_second": rates,
            "embeddings": embeddings.astype(float).tolist(),
            # ru_maxrss is in KiB on Linux.
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        },
        sys.stdout,
    )


main()
