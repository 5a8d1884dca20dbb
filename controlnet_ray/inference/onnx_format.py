"""The exported generator's ONNX contract: input/output names and metadata keys, written by
``controlnet_ray.export`` and read by ``runners.OnnxRunner``."""

ONNX_INPUTS = ("image", "source_pose", "target_pose")
ONNX_OUTPUT = "output"
ONNX_FORMAT = "controlnet_ray.generator/1"
META_FORMAT = "controlnet_ray.format"
META_IMAGE_SIZE = "controlnet_ray.image_size"
META_CONVENTION = "controlnet_ray.pose_convention"
META_INPUT_RANGE = "controlnet_ray.input_range"
META_POSE_LIMITS = "controlnet_ray.pose_limits_deg"
META_FRAMING = "controlnet_ray.framing"  # absent in exports made before head framing: arcface
META_SIGNATURE = "controlnet_ray.model_signature"
META_SOURCE = "controlnet_ray.source_checkpoint"
META_POSE_ESTIMATE = "controlnet_ray.pose_estimate"  # JSON; absent: the default (data.pose.photo)
INPUT_RANGE = (
    "RGB, NCHW float32 in [-1, 1] (pixel / 127.5 - 1), a crop framed as "
    f"metadata {META_FRAMING} says (head: the head-centred crop of data.align)"
)
