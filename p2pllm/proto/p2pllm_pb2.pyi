from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("mem_bytes", "flops", "mem_bw", "net_bw", "cpu_count", "device")
    MEM_BYTES_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    MEM_BW_FIELD_NUMBER: _ClassVar[int]
    NET_BW_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    mem_bytes: int
    flops: float
    mem_bw: float
    net_bw: float
    cpu_count: int
    device: str
    def __init__(self, mem_bytes: _Optional[int] = ..., flops: _Optional[float] = ..., mem_bw: _Optional[float] = ..., net_bw: _Optional[float] = ..., cpu_count: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...

class PeerInfo(_message.Message):
    __slots__ = ("id", "name", "cluster", "protocol", "address", "gateway_port", "model_fingerprint", "caps", "n_layers")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_PORT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CAPS_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    cluster: str
    protocol: int
    address: str
    gateway_port: int
    model_fingerprint: str
    caps: Capabilities
    n_layers: int
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., cluster: _Optional[str] = ..., protocol: _Optional[int] = ..., address: _Optional[str] = ..., gateway_port: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., caps: _Optional[_Union[Capabilities, _Mapping]] = ..., n_layers: _Optional[int] = ...) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ("peer",)
    PEER_FIELD_NUMBER: _ClassVar[int]
    peer: PeerInfo
    def __init__(self, peer: _Optional[_Union[PeerInfo, _Mapping]] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("peer", "compatible", "reason", "known")
    PEER_FIELD_NUMBER: _ClassVar[int]
    COMPATIBLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    peer: PeerInfo
    compatible: bool
    reason: str
    known: _containers.RepeatedCompositeFieldContainer[PeerInfo]
    def __init__(self, peer: _Optional[_Union[PeerInfo, _Mapping]] = ..., compatible: _Optional[bool] = ..., reason: _Optional[str] = ..., known: _Optional[_Iterable[_Union[PeerInfo, _Mapping]]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ("from_id",)
    FROM_ID_FIELD_NUMBER: _ClassVar[int]
    from_id: str
    def __init__(self, from_id: _Optional[str] = ...) -> None: ...

class LinkStats(_message.Message):
    __slots__ = ("peer_id", "rtt_s", "bw")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    RTT_S_FIELD_NUMBER: _ClassVar[int]
    BW_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    rtt_s: float
    bw: float
    def __init__(self, peer_id: _Optional[str] = ..., rtt_s: _Optional[float] = ..., bw: _Optional[float] = ...) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("id", "state", "epoch", "coordinator", "load_progress", "links", "peers", "mem_used", "head", "holds", "fetch")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    LOAD_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    MEM_USED_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    HOLDS_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: str
    epoch: int
    coordinator: str
    load_progress: float
    links: _containers.RepeatedCompositeFieldContainer[LinkStats]
    peers: _containers.RepeatedScalarFieldContainer[str]
    mem_used: int
    head: HeadLoad
    holds: Holding
    fetch: FetchProgress
    def __init__(self, id: _Optional[str] = ..., state: _Optional[str] = ..., epoch: _Optional[int] = ..., coordinator: _Optional[str] = ..., load_progress: _Optional[float] = ..., links: _Optional[_Iterable[_Union[LinkStats, _Mapping]]] = ..., peers: _Optional[_Iterable[str]] = ..., mem_used: _Optional[int] = ..., head: _Optional[_Union[HeadLoad, _Mapping]] = ..., holds: _Optional[_Union[Holding, _Mapping]] = ..., fetch: _Optional[_Union[FetchProgress, _Mapping]] = ...) -> None: ...

class FetchProgress(_message.Message):
    __slots__ = ("start", "end", "done", "total", "rate")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    done: int
    total: int
    rate: float
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., rate: _Optional[float] = ...) -> None: ...

class Holding(_message.Message):
    __slots__ = ("layers", "embed", "head")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    EMBED_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedScalarFieldContainer[int]
    embed: bool
    head: bool
    def __init__(self, layers: _Optional[_Iterable[int]] = ..., embed: _Optional[bool] = ..., head: _Optional[bool] = ...) -> None: ...

class HeadLoad(_message.Message):
    __slots__ = ("queued", "running", "tokens_generated")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    queued: int
    running: int
    tokens_generated: int
    def __init__(self, queued: _Optional[int] = ..., running: _Optional[int] = ..., tokens_generated: _Optional[int] = ...) -> None: ...

class StageAssignment(_message.Message):
    __slots__ = ("peer_id", "address", "start", "end")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    address: str
    start: int
    end: int
    def __init__(self, peer_id: _Optional[str] = ..., address: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class ResumeSeq(_message.Message):
    __slots__ = ("seq_id", "positions")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    positions: int
    def __init__(self, seq_id: _Optional[int] = ..., positions: _Optional[int] = ...) -> None: ...

class KVSource(_message.Message):
    __slots__ = ("start", "end", "owner_address", "replica_address")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    OWNER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    owner_address: str
    replica_address: str
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., owner_address: _Optional[str] = ..., replica_address: _Optional[str] = ...) -> None: ...

class PlanProposal(_message.Message):
    __slots__ = ("epoch", "coordinator", "stages", "plan_json", "model_fingerprint", "head_address", "resume", "sources", "kv_replicas")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    HEAD_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    KV_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    coordinator: str
    stages: _containers.RepeatedCompositeFieldContainer[StageAssignment]
    plan_json: str
    model_fingerprint: str
    head_address: str
    resume: _containers.RepeatedCompositeFieldContainer[ResumeSeq]
    sources: _containers.RepeatedCompositeFieldContainer[KVSource]
    kv_replicas: int
    def __init__(self, epoch: _Optional[int] = ..., coordinator: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[StageAssignment, _Mapping]]] = ..., plan_json: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., head_address: _Optional[str] = ..., resume: _Optional[_Iterable[_Union[ResumeSeq, _Mapping]]] = ..., sources: _Optional[_Iterable[_Union[KVSource, _Mapping]]] = ..., kv_replicas: _Optional[int] = ...) -> None: ...

class PlanReply(_message.Message):
    __slots__ = ("ok", "reason", "restored")
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    reason: str
    restored: _containers.RepeatedCompositeFieldContainer[ResumeSeq]
    def __init__(self, ok: _Optional[bool] = ..., reason: _Optional[str] = ..., restored: _Optional[_Iterable[_Union[ResumeSeq, _Mapping]]] = ...) -> None: ...

class FetchKVRequest(_message.Message):
    __slots__ = ("seq_ids", "positions", "start", "end", "from_replica")
    SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    FROM_REPLICA_FIELD_NUMBER: _ClassVar[int]
    seq_ids: _containers.RepeatedScalarFieldContainer[int]
    positions: int
    start: int
    end: int
    from_replica: bool
    def __init__(self, seq_ids: _Optional[_Iterable[int]] = ..., positions: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., from_replica: _Optional[bool] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("epoch", "coordinator")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    coordinator: str
    def __init__(self, epoch: _Optional[int] = ..., coordinator: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class ManageRequest(_message.Message):
    __slots__ = ("action", "target", "forwarded")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    FORWARDED_FIELD_NUMBER: _ClassVar[int]
    action: str
    target: str
    forwarded: bool
    def __init__(self, action: _Optional[str] = ..., target: _Optional[str] = ..., forwarded: _Optional[bool] = ...) -> None: ...

class ManageReply(_message.Message):
    __slots__ = ("ok", "message", "json")
    OK_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    message: str
    json: str
    def __init__(self, ok: _Optional[bool] = ..., message: _Optional[str] = ..., json: _Optional[str] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("payload", "reply_bytes")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    REPLY_BYTES_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    reply_bytes: int
    def __init__(self, payload: _Optional[bytes] = ..., reply_bytes: _Optional[int] = ...) -> None: ...

class PingReply(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...

class SequenceStart(_message.Message):
    __slots__ = ("seq_id", "capacity", "temperature", "top_k", "top_p", "has_seed", "seed", "presence_penalty", "frequency_penalty", "bias_ids", "bias_values", "generated", "grammar", "logprobs", "top_logprobs", "embed", "has_fork", "fork_of", "fork_len")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    HAS_SEED_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    BIAS_IDS_FIELD_NUMBER: _ClassVar[int]
    BIAS_VALUES_FIELD_NUMBER: _ClassVar[int]
    GENERATED_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    EMBED_FIELD_NUMBER: _ClassVar[int]
    HAS_FORK_FIELD_NUMBER: _ClassVar[int]
    FORK_OF_FIELD_NUMBER: _ClassVar[int]
    FORK_LEN_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    capacity: int
    temperature: float
    top_k: int
    top_p: float
    has_seed: bool
    seed: int
    presence_penalty: float
    frequency_penalty: float
    bias_ids: _containers.RepeatedScalarFieldContainer[int]
    bias_values: _containers.RepeatedScalarFieldContainer[float]
    generated: _containers.RepeatedScalarFieldContainer[int]
    grammar: str
    logprobs: bool
    top_logprobs: int
    embed: bool
    has_fork: bool
    fork_of: int
    fork_len: int
    def __init__(self, seq_id: _Optional[int] = ..., capacity: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., has_seed: _Optional[bool] = ..., seed: _Optional[int] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., bias_ids: _Optional[_Iterable[int]] = ..., bias_values: _Optional[_Iterable[float]] = ..., generated: _Optional[_Iterable[int]] = ..., grammar: _Optional[str] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., embed: _Optional[bool] = ..., has_fork: _Optional[bool] = ..., fork_of: _Optional[int] = ..., fork_len: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("seq_id", "start", "length", "sample")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    start: int
    length: int
    sample: bool
    def __init__(self, seq_id: _Optional[int] = ..., start: _Optional[int] = ..., length: _Optional[int] = ..., sample: _Optional[bool] = ...) -> None: ...

class KVDelta(_message.Message):
    __slots__ = ("seq_id", "start", "first_layer", "data", "epoch", "format")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    FIRST_LAYER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    seq_id: int
    start: int
    first_layer: int
    data: Tensor
    epoch: int
    format: str
    def __init__(self, seq_id: _Optional[int] = ..., start: _Optional[int] = ..., first_layer: _Optional[int] = ..., data: _Optional[_Union[Tensor, _Mapping]] = ..., epoch: _Optional[int] = ..., format: _Optional[str] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("epoch", "micro_batch", "chunks", "tokens", "hidden", "starts", "finished", "sampled", "kv", "error", "to_head", "replica", "sampled_logprobs", "top_counts", "top_ids", "top_logprobs", "pooled_seqs", "pooled", "retained")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    STARTS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TO_HEAD_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_COUNTS_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    POOLED_SEQS_FIELD_NUMBER: _ClassVar[int]
    POOLED_FIELD_NUMBER: _ClassVar[int]
    RETAINED_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    micro_batch: int
    chunks: _containers.RepeatedCompositeFieldContainer[Chunk]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    hidden: Tensor
    starts: _containers.RepeatedCompositeFieldContainer[SequenceStart]
    finished: _containers.RepeatedScalarFieldContainer[int]
    sampled: _containers.RepeatedScalarFieldContainer[int]
    kv: _containers.RepeatedCompositeFieldContainer[KVDelta]
    error: str
    to_head: bool
    replica: bool
    sampled_logprobs: _containers.RepeatedScalarFieldContainer[float]
    top_counts: _containers.RepeatedScalarFieldContainer[int]
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    pooled_seqs: _containers.RepeatedScalarFieldContainer[int]
    pooled: Tensor
    retained: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, epoch: _Optional[int] = ..., micro_batch: _Optional[int] = ..., chunks: _Optional[_Iterable[_Union[Chunk, _Mapping]]] = ..., tokens: _Optional[_Iterable[int]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., starts: _Optional[_Iterable[_Union[SequenceStart, _Mapping]]] = ..., finished: _Optional[_Iterable[int]] = ..., sampled: _Optional[_Iterable[int]] = ..., kv: _Optional[_Iterable[_Union[KVDelta, _Mapping]]] = ..., error: _Optional[str] = ..., to_head: _Optional[bool] = ..., replica: _Optional[bool] = ..., sampled_logprobs: _Optional[_Iterable[float]] = ..., top_counts: _Optional[_Iterable[int]] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ..., pooled_seqs: _Optional[_Iterable[int]] = ..., pooled: _Optional[_Union[Tensor, _Mapping]] = ..., retained: _Optional[_Iterable[int]] = ...) -> None: ...

class FrameAck(_message.Message):
    __slots__ = ("micro_batch", "error")
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    micro_batch: int
    error: str
    def __init__(self, micro_batch: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt_ids", "max_tokens", "temperature", "top_k", "top_p", "has_seed", "seed", "stop", "ignore_eos", "presence_penalty", "frequency_penalty", "bias_ids", "bias_values", "grammar", "logprobs", "top_logprobs", "n")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    HAS_SEED_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    BIAS_IDS_FIELD_NUMBER: _ClassVar[int]
    BIAS_VALUES_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    has_seed: bool
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    presence_penalty: float
    frequency_penalty: float
    bias_ids: _containers.RepeatedScalarFieldContainer[int]
    bias_values: _containers.RepeatedScalarFieldContainer[float]
    grammar: str
    logprobs: bool
    top_logprobs: int
    n: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., has_seed: _Optional[bool] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., bias_ids: _Optional[_Iterable[int]] = ..., bias_values: _Optional[_Iterable[float]] = ..., grammar: _Optional[str] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., n: _Optional[int] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("has_token", "token_id", "text", "finish_reason", "error", "status", "code", "has_logprob", "logprob", "top_ids", "top_logprobs", "index", "cached_tokens")
    HAS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    HAS_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    has_token: bool
    token_id: int
    text: str
    finish_reason: str
    error: str
    status: int
    code: str
    has_logprob: bool
    logprob: float
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    index: int
    cached_tokens: int
    def __init__(self, has_token: _Optional[bool] = ..., token_id: _Optional[int] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., error: _Optional[str] = ..., status: _Optional[int] = ..., code: _Optional[str] = ..., has_logprob: _Optional[bool] = ..., logprob: _Optional[float] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ..., index: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("request_id", "inputs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    inputs: _containers.RepeatedCompositeFieldContainer[TokenIds]
    def __init__(self, request_id: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TokenIds, _Mapping]]] = ...) -> None: ...

class EmbedReply(_message.Message):
    __slots__ = ("vectors", "status", "code", "error")
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    vectors: Tensor
    status: int
    code: str
    error: str
    def __init__(self, vectors: _Optional[_Union[Tensor, _Mapping]] = ..., status: _Optional[int] = ..., code: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class ModelPiece(_message.Message):
    __slots__ = ("name", "offset", "nbytes", "layer", "sha256", "held", "file")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    nbytes: int
    layer: int
    sha256: str
    held: bool
    file: str
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., layer: _Optional[int] = ..., sha256: _Optional[str] = ..., held: _Optional[bool] = ..., file: _Optional[str] = ...) -> None: ...

class ManifestFile(_message.Message):
    __slots__ = ("name", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class ManifestRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("model_name", "fingerprint", "format", "file_name", "size", "n_layers", "pieces", "files")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    fingerprint: str
    format: str
    file_name: str
    size: int
    n_layers: int
    pieces: _containers.RepeatedCompositeFieldContainer[ModelPiece]
    files: _containers.RepeatedCompositeFieldContainer[ManifestFile]
    def __init__(self, model_name: _Optional[str] = ..., fingerprint: _Optional[str] = ..., format: _Optional[str] = ..., file_name: _Optional[str] = ..., size: _Optional[int] = ..., n_layers: _Optional[int] = ..., pieces: _Optional[_Iterable[_Union[ModelPiece, _Mapping]]] = ..., files: _Optional[_Iterable[_Union[ManifestFile, _Mapping]]] = ...) -> None: ...

class FetchPieceRequest(_message.Message):
    __slots__ = ("fingerprint", "piece", "offset", "length")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PIECE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    piece: str
    offset: int
    length: int
    def __init__(self, fingerprint: _Optional[str] = ..., piece: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class PieceChunk(_message.Message):
    __slots__ = ("sha256", "piece_nbytes", "offset", "data")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    PIECE_NBYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    piece_nbytes: int
    offset: int
    data: bytes
    def __init__(self, sha256: _Optional[str] = ..., piece_nbytes: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...
