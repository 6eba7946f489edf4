"""The fixed workload every devicecheck phase renders: the model id and the prompts."""

MODEL_ID = "devicecheck-sd15"
PROMPT = "a photo of a cat"
NEGATIVE = "blurry, low quality"
