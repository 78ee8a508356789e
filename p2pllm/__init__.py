"""p2pllm: peer-to-peer pipeline-parallel LLM serving."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 3  # 2: KV travels as raw rows in the sender's KV format; 3: penalties and logit_bias
