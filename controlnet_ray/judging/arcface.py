"""ArcFace identity cosine for ``python -m controlnet_ray.evaluate --arcface``: an InsightFace
recognition model run with onnxruntime (also the judged report's optional embedder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from controlnet_ray.inference import InferenceError


class ArcFaceScorer:
    """An ArcFace ONNX model (InsightFace's recognition format) run with onnxruntime.

    Preprocessing follows ``insightface.model_zoo.ArcFaceONNX``: RGB, resized to the model's
    input size, ``(x - 127.5) / 127.5`` unless the graph normalises itself (its first nodes are
    ``Sub``/``Mul``, as in some exports), then raw 0..255.  Embeddings are L2-normalised.
    """

    def __init__(self, path: str | Path, device: str = "auto") -> None:
        import onnx
        import onnxruntime as ort

        from controlnet_ray.data.detect import onnx_providers

        self.path = Path(path)
        providers = onnx_providers(device)
        try:
            graph = onnx.load(str(self.path), load_external_data=False).graph
            self.session = ort.InferenceSession(str(self.path), providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnx/onnxruntime raise many types
            raise InferenceError(
                f"--arcface {self.path}: not a readable ONNX model: {exc}"
            ) from exc
        inp = self.session.get_inputs()[0]
        shape = inp.shape
        if len(shape) != 4 or shape[1] != 3:
            raise InferenceError(f"--arcface {self.path}: input {inp.name} {shape} is not NCHW RGB")
        self.input_name = inp.name
        self.size = (int(shape[3]), int(shape[2])) if isinstance(shape[2], int) else (112, 112)
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        ops = [n.op_type for n in graph.node[:8]]
        self.mean, self.std = (0.0, 1.0) if "Sub" in ops and "Mul" in ops else (127.5, 127.5)

    def embed(self, rgb: np.ndarray) -> np.ndarray:
        """[N, H, W, 3] uint8 -> [N, D] unit vectors."""
        import cv2

        x = np.stack([cv2.resize(im, self.size, interpolation=cv2.INTER_LINEAR) for im in rgb])
        x = ((x.astype(np.float32) - self.mean) / self.std).transpose(0, 3, 1, 2)
        step = self.fixed_batch or len(x)
        out = np.concatenate(
            [
                self.session.run(None, {self.input_name: x[i : i + step]})[0]
                for i in range(0, len(x), step)
            ]
        )
        out = out.reshape(len(x), -1).astype(np.float64)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
