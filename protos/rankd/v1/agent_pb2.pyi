from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StreamKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STREAM_KIND_UNSPECIFIED: _ClassVar[StreamKind]
    STDOUT: _ClassVar[StreamKind]
    STDERR: _ClassVar[StreamKind]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    RUNNING: _ClassVar[JobState]
    SUCCEEDED: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
    KILLED: _ClassVar[JobState]

class RankState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RANK_STATE_UNSPECIFIED: _ClassVar[RankState]
    RANK_RUNNING: _ClassVar[RankState]
    RANK_SUCCEEDED: _ClassVar[RankState]
    RANK_FAILED: _ClassVar[RankState]
    RANK_TERMINATED: _ClassVar[RankState]
STREAM_KIND_UNSPECIFIED: StreamKind
STDOUT: StreamKind
STDERR: StreamKind
JOB_STATE_UNSPECIFIED: JobState
RUNNING: JobState
SUCCEEDED: JobState
FAILED: JobState
KILLED: JobState
RANK_STATE_UNSPECIFIED: RankState
RANK_RUNNING: RankState
RANK_SUCCEEDED: RankState
RANK_FAILED: RankState
RANK_TERMINATED: RankState

class RankArgs(_message.Message):
    __slots__ = ("args",)
    ARGS_FIELD_NUMBER: _ClassVar[int]
    args: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, args: _Optional[_Iterable[str]] = ...) -> None: ...

class RankEnv(_message.Message):
    __slots__ = ("env",)
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ENV_FIELD_NUMBER: _ClassVar[int]
    env: _containers.ScalarMap[str, str]
    def __init__(self, env: _Optional[_Mapping[str, str]] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("job_id", "nprocs", "entrypoint", "args", "rank_args", "env", "rank_env", "cwd", "role_name", "restart_count", "redirects", "tee", "local_ranks_filter", "log_line_prefix_template", "duplicate_stdout_filters", "duplicate_stderr_filters", "rank_offset", "kill_timeout", "default_env", "lease", "numa_binding", "cpu_bind")
    class RankArgsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: RankArgs
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[RankArgs, _Mapping]] = ...) -> None: ...
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class RankEnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: RankEnv
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[RankEnv, _Mapping]] = ...) -> None: ...
    class DefaultEnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NPROCS_FIELD_NUMBER: _ClassVar[int]
    ENTRYPOINT_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    RANK_ARGS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    RANK_ENV_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    ROLE_NAME_FIELD_NUMBER: _ClassVar[int]
    RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    REDIRECTS_FIELD_NUMBER: _ClassVar[int]
    TEE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_RANKS_FILTER_FIELD_NUMBER: _ClassVar[int]
    LOG_LINE_PREFIX_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_STDOUT_FILTERS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_STDERR_FILTERS_FIELD_NUMBER: _ClassVar[int]
    RANK_OFFSET_FIELD_NUMBER: _ClassVar[int]
    KILL_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_ENV_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    NUMA_BINDING_FIELD_NUMBER: _ClassVar[int]
    CPU_BIND_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    nprocs: int
    entrypoint: str
    args: _containers.RepeatedScalarFieldContainer[str]
    rank_args: _containers.MessageMap[int, RankArgs]
    env: _containers.ScalarMap[str, str]
    rank_env: _containers.MessageMap[int, RankEnv]
    cwd: str
    role_name: str
    restart_count: int
    redirects: str
    tee: str
    local_ranks_filter: _containers.RepeatedScalarFieldContainer[int]
    log_line_prefix_template: str
    duplicate_stdout_filters: _containers.RepeatedScalarFieldContainer[str]
    duplicate_stderr_filters: _containers.RepeatedScalarFieldContainer[str]
    rank_offset: int
    kill_timeout: float
    default_env: _containers.ScalarMap[str, str]
    lease: float
    numa_binding: str
    cpu_bind: str
    def __init__(self, job_id: _Optional[str] = ..., nprocs: _Optional[int] = ..., entrypoint: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., rank_args: _Optional[_Mapping[int, RankArgs]] = ..., env: _Optional[_Mapping[str, str]] = ..., rank_env: _Optional[_Mapping[int, RankEnv]] = ..., cwd: _Optional[str] = ..., role_name: _Optional[str] = ..., restart_count: _Optional[int] = ..., redirects: _Optional[str] = ..., tee: _Optional[str] = ..., local_ranks_filter: _Optional[_Iterable[int]] = ..., log_line_prefix_template: _Optional[str] = ..., duplicate_stdout_filters: _Optional[_Iterable[str]] = ..., duplicate_stderr_filters: _Optional[_Iterable[str]] = ..., rank_offset: _Optional[int] = ..., kill_timeout: _Optional[float] = ..., default_env: _Optional[_Mapping[str, str]] = ..., lease: _Optional[float] = ..., numa_binding: _Optional[str] = ..., cpu_bind: _Optional[str] = ...) -> None: ...

class StartRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class StartResponse(_message.Message):
    __slots__ = ("job", "created", "agent_time")
    JOB_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    AGENT_TIME_FIELD_NUMBER: _ClassVar[int]
    job: JobStatus
    created: bool
    agent_time: float
    def __init__(self, job: _Optional[_Union[JobStatus, _Mapping]] = ..., created: _Optional[bool] = ..., agent_time: _Optional[float] = ...) -> None: ...

class Failure(_message.Message):
    __slots__ = ("local_rank", "pid", "exit_code", "signal_name", "message", "error_file", "error_file_data", "traceback", "timestamp", "stderr_tail", "terminated_by_agent", "error_file_problem")
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FILE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FILE_DATA_FIELD_NUMBER: _ClassVar[int]
    TRACEBACK_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    STDERR_TAIL_FIELD_NUMBER: _ClassVar[int]
    TERMINATED_BY_AGENT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FILE_PROBLEM_FIELD_NUMBER: _ClassVar[int]
    local_rank: int
    pid: int
    exit_code: int
    signal_name: str
    message: str
    error_file: str
    error_file_data: str
    traceback: str
    timestamp: float
    stderr_tail: _containers.RepeatedScalarFieldContainer[str]
    terminated_by_agent: bool
    error_file_problem: str
    def __init__(self, local_rank: _Optional[int] = ..., pid: _Optional[int] = ..., exit_code: _Optional[int] = ..., signal_name: _Optional[str] = ..., message: _Optional[str] = ..., error_file: _Optional[str] = ..., error_file_data: _Optional[str] = ..., traceback: _Optional[str] = ..., timestamp: _Optional[float] = ..., stderr_tail: _Optional[_Iterable[str]] = ..., terminated_by_agent: _Optional[bool] = ..., error_file_problem: _Optional[str] = ...) -> None: ...

class RankStatus(_message.Message):
    __slots__ = ("local_rank", "pid", "state", "exit_code", "signal_name", "start_time", "end_time", "stdout_path", "stderr_path", "error_file", "rss_bytes", "cpu_seconds", "cpu_percent", "last_output_time", "stdout_bytes", "stderr_bytes", "failure", "file_problems", "cpus")
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_NAME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    STDOUT_PATH_FIELD_NUMBER: _ClassVar[int]
    STDERR_PATH_FIELD_NUMBER: _ClassVar[int]
    ERROR_FILE_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    LAST_OUTPUT_TIME_FIELD_NUMBER: _ClassVar[int]
    STDOUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    STDERR_BYTES_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    FILE_PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    local_rank: int
    pid: int
    state: RankState
    exit_code: int
    signal_name: str
    start_time: float
    end_time: float
    stdout_path: str
    stderr_path: str
    error_file: str
    rss_bytes: int
    cpu_seconds: float
    cpu_percent: float
    last_output_time: float
    stdout_bytes: int
    stderr_bytes: int
    failure: Failure
    file_problems: _containers.RepeatedScalarFieldContainer[str]
    cpus: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, local_rank: _Optional[int] = ..., pid: _Optional[int] = ..., state: _Optional[_Union[RankState, str]] = ..., exit_code: _Optional[int] = ..., signal_name: _Optional[str] = ..., start_time: _Optional[float] = ..., end_time: _Optional[float] = ..., stdout_path: _Optional[str] = ..., stderr_path: _Optional[str] = ..., error_file: _Optional[str] = ..., rss_bytes: _Optional[int] = ..., cpu_seconds: _Optional[float] = ..., cpu_percent: _Optional[float] = ..., last_output_time: _Optional[float] = ..., stdout_bytes: _Optional[int] = ..., stderr_bytes: _Optional[int] = ..., failure: _Optional[_Union[Failure, _Mapping]] = ..., file_problems: _Optional[_Iterable[str]] = ..., cpus: _Optional[_Iterable[int]] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("job_id", "state", "restart_count", "nprocs", "run_dir", "attempt_dir", "ranks", "failures", "start_time", "end_time", "reason", "spec")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    NPROCS_FIELD_NUMBER: _ClassVar[int]
    RUN_DIR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_DIR_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    restart_count: int
    nprocs: int
    run_dir: str
    attempt_dir: str
    ranks: _containers.RepeatedCompositeFieldContainer[RankStatus]
    failures: _containers.RepeatedCompositeFieldContainer[Failure]
    start_time: float
    end_time: float
    reason: str
    spec: JobSpec
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., restart_count: _Optional[int] = ..., nprocs: _Optional[int] = ..., run_dir: _Optional[str] = ..., attempt_dir: _Optional[str] = ..., ranks: _Optional[_Iterable[_Union[RankStatus, _Mapping]]] = ..., failures: _Optional[_Iterable[_Union[Failure, _Mapping]]] = ..., start_time: _Optional[float] = ..., end_time: _Optional[float] = ..., reason: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class PollRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class PollResponse(_message.Message):
    __slots__ = ("job", "agent_time", "version")
    JOB_FIELD_NUMBER: _ClassVar[int]
    AGENT_TIME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    job: JobStatus
    agent_time: float
    version: int
    def __init__(self, job: _Optional[_Union[JobStatus, _Mapping]] = ..., agent_time: _Optional[float] = ..., version: _Optional[int] = ...) -> None: ...

class Cursor(_message.Message):
    __slots__ = ("local_rank", "stream", "offset")
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    local_rank: int
    stream: StreamKind
    offset: int
    def __init__(self, local_rank: _Optional[int] = ..., stream: _Optional[_Union[StreamKind, str]] = ..., offset: _Optional[int] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("job_id", "ranks", "streams", "contains", "regex", "follow", "resume", "restart_count", "packed", "heartbeat")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    CONTAINS_FIELD_NUMBER: _ClassVar[int]
    REGEX_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    ranks: _containers.RepeatedScalarFieldContainer[int]
    streams: _containers.RepeatedScalarFieldContainer[StreamKind]
    contains: str
    regex: str
    follow: bool
    resume: _containers.RepeatedCompositeFieldContainer[Cursor]
    restart_count: int
    packed: bool
    heartbeat: float
    def __init__(self, job_id: _Optional[str] = ..., ranks: _Optional[_Iterable[int]] = ..., streams: _Optional[_Iterable[_Union[StreamKind, str]]] = ..., contains: _Optional[str] = ..., regex: _Optional[str] = ..., follow: _Optional[bool] = ..., resume: _Optional[_Iterable[_Union[Cursor, _Mapping]]] = ..., restart_count: _Optional[int] = ..., packed: _Optional[bool] = ..., heartbeat: _Optional[float] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("local_rank", "stream", "offset", "text", "prefix", "partial", "notice")
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    local_rank: int
    stream: StreamKind
    offset: int
    text: str
    prefix: str
    partial: bool
    notice: bool
    def __init__(self, local_rank: _Optional[int] = ..., stream: _Optional[_Union[StreamKind, str]] = ..., offset: _Optional[int] = ..., text: _Optional[str] = ..., prefix: _Optional[str] = ..., partial: _Optional[bool] = ..., notice: _Optional[bool] = ...) -> None: ...

class LogBlock(_message.Message):
    __slots__ = ("local_rank", "stream", "offset", "data", "count", "prefix", "partial")
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    local_rank: int
    stream: StreamKind
    offset: int
    data: bytes
    count: int
    prefix: str
    partial: bool
    def __init__(self, local_rank: _Optional[int] = ..., stream: _Optional[_Union[StreamKind, str]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., count: _Optional[int] = ..., prefix: _Optional[str] = ..., partial: _Optional[bool] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("lines", "blocks", "end", "job", "restart_count")
    LINES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedCompositeFieldContainer[LogLine]
    blocks: _containers.RepeatedCompositeFieldContainer[LogBlock]
    end: bool
    job: JobStatus
    restart_count: int
    def __init__(self, lines: _Optional[_Iterable[_Union[LogLine, _Mapping]]] = ..., blocks: _Optional[_Iterable[_Union[LogBlock, _Mapping]]] = ..., end: _Optional[bool] = ..., job: _Optional[_Union[JobStatus, _Mapping]] = ..., restart_count: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("job_id", "until_ended", "heartbeat")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    UNTIL_ENDED_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    until_ended: bool
    heartbeat: float
    def __init__(self, job_id: _Optional[str] = ..., until_ended: _Optional[bool] = ..., heartbeat: _Optional[float] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("version", "job", "ended", "agent_time")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    AGENT_TIME_FIELD_NUMBER: _ClassVar[int]
    version: int
    job: JobStatus
    ended: bool
    agent_time: float
    def __init__(self, version: _Optional[int] = ..., job: _Optional[_Union[JobStatus, _Mapping]] = ..., ended: _Optional[bool] = ..., agent_time: _Optional[float] = ...) -> None: ...

class KillRequest(_message.Message):
    __slots__ = ("job_id", "signal", "timeout", "no_escalate", "requester")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    NO_ESCALATE_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    signal: str
    timeout: float
    no_escalate: bool
    requester: str
    def __init__(self, job_id: _Optional[str] = ..., signal: _Optional[str] = ..., timeout: _Optional[float] = ..., no_escalate: _Optional[bool] = ..., requester: _Optional[str] = ...) -> None: ...

class KillResponse(_message.Message):
    __slots__ = ("job", "version", "agent_time")
    JOB_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_TIME_FIELD_NUMBER: _ClassVar[int]
    job: JobStatus
    version: int
    agent_time: float
    def __init__(self, job: _Optional[_Union[JobStatus, _Mapping]] = ..., version: _Optional[int] = ..., agent_time: _Optional[float] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class RenewResponse(_message.Message):
    __slots__ = ("remaining", "agent_time")
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    AGENT_TIME_FIELD_NUMBER: _ClassVar[int]
    remaining: float
    agent_time: float
    def __init__(self, remaining: _Optional[float] = ..., agent_time: _Optional[float] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobStatus]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobStatus, _Mapping]]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("hostname", "version", "agent_time", "pid", "log_dir", "free_port", "log_follow", "polled_attempts", "log_dir_free_bytes", "min_free_bytes", "open_fds", "fd_soft_limit", "fd_hard_limit", "guardian_pid", "guardian_restarts", "topology")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_TIME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    LOG_DIR_FIELD_NUMBER: _ClassVar[int]
    FREE_PORT_FIELD_NUMBER: _ClassVar[int]
    LOG_FOLLOW_FIELD_NUMBER: _ClassVar[int]
    POLLED_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LOG_DIR_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIN_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OPEN_FDS_FIELD_NUMBER: _ClassVar[int]
    FD_SOFT_LIMIT_FIELD_NUMBER: _ClassVar[int]
    FD_HARD_LIMIT_FIELD_NUMBER: _ClassVar[int]
    GUARDIAN_PID_FIELD_NUMBER: _ClassVar[int]
    GUARDIAN_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    version: str
    agent_time: float
    pid: int
    log_dir: str
    free_port: int
    log_follow: str
    polled_attempts: int
    log_dir_free_bytes: int
    min_free_bytes: int
    open_fds: int
    fd_soft_limit: int
    fd_hard_limit: int
    guardian_pid: int
    guardian_restarts: int
    topology: Topology
    def __init__(self, hostname: _Optional[str] = ..., version: _Optional[str] = ..., agent_time: _Optional[float] = ..., pid: _Optional[int] = ..., log_dir: _Optional[str] = ..., free_port: _Optional[int] = ..., log_follow: _Optional[str] = ..., polled_attempts: _Optional[int] = ..., log_dir_free_bytes: _Optional[int] = ..., min_free_bytes: _Optional[int] = ..., open_fds: _Optional[int] = ..., fd_soft_limit: _Optional[int] = ..., fd_hard_limit: _Optional[int] = ..., guardian_pid: _Optional[int] = ..., guardian_restarts: _Optional[int] = ..., topology: _Optional[_Union[Topology, _Mapping]] = ...) -> None: ...

class CpuSet(_message.Message):
    __slots__ = ("id", "cpus")
    ID_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    id: int
    cpus: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, id: _Optional[int] = ..., cpus: _Optional[_Iterable[int]] = ...) -> None: ...

class Gpu(_message.Message):
    __slots__ = ("index", "numa_node", "pci_address")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NUMA_NODE_FIELD_NUMBER: _ClassVar[int]
    PCI_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    index: int
    numa_node: int
    pci_address: str
    def __init__(self, index: _Optional[int] = ..., numa_node: _Optional[int] = ..., pci_address: _Optional[str] = ...) -> None: ...

class Topology(_message.Message):
    __slots__ = ("cpus", "numa_nodes", "sockets", "l3_groups", "gpus")
    CPUS_FIELD_NUMBER: _ClassVar[int]
    NUMA_NODES_FIELD_NUMBER: _ClassVar[int]
    SOCKETS_FIELD_NUMBER: _ClassVar[int]
    L3_GROUPS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    cpus: _containers.RepeatedScalarFieldContainer[int]
    numa_nodes: _containers.RepeatedCompositeFieldContainer[CpuSet]
    sockets: _containers.RepeatedCompositeFieldContainer[CpuSet]
    l3_groups: _containers.RepeatedCompositeFieldContainer[CpuSet]
    gpus: _containers.RepeatedCompositeFieldContainer[Gpu]
    def __init__(self, cpus: _Optional[_Iterable[int]] = ..., numa_nodes: _Optional[_Iterable[_Union[CpuSet, _Mapping]]] = ..., sockets: _Optional[_Iterable[_Union[CpuSet, _Mapping]]] = ..., l3_groups: _Optional[_Iterable[_Union[CpuSet, _Mapping]]] = ..., gpus: _Optional[_Iterable[_Union[Gpu, _Mapping]]] = ...) -> None: ...

class StacksRequest(_message.Message):
    __slots__ = ("job_id", "local_ranks", "native", "timeout")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    LOCAL_RANKS_FIELD_NUMBER: _ClassVar[int]
    NATIVE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    local_ranks: _containers.RepeatedScalarFieldContainer[int]
    native: bool
    timeout: float
    def __init__(self, job_id: _Optional[str] = ..., local_ranks: _Optional[_Iterable[int]] = ..., native: _Optional[bool] = ..., timeout: _Optional[float] = ...) -> None: ...

class StackFrame(_message.Message):
    __slots__ = ("function", "filename", "line")
    FUNCTION_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    function: str
    filename: str
    line: int
    def __init__(self, function: _Optional[str] = ..., filename: _Optional[str] = ..., line: _Optional[int] = ...) -> None: ...

class ThreadStack(_message.Message):
    __slots__ = ("name", "thread_id", "active", "owns_gil", "frames")
    NAME_FIELD_NUMBER: _ClassVar[int]
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    OWNS_GIL_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    name: str
    thread_id: int
    active: bool
    owns_gil: bool
    frames: _containers.RepeatedCompositeFieldContainer[StackFrame]
    def __init__(self, name: _Optional[str] = ..., thread_id: _Optional[int] = ..., active: _Optional[bool] = ..., owns_gil: _Optional[bool] = ..., frames: _Optional[_Iterable[_Union[StackFrame, _Mapping]]] = ...) -> None: ...

class RankStacks(_message.Message):
    __slots__ = ("local_rank", "global_rank", "pid", "threads", "error", "silent_for", "last_line", "cpu_percent")
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_RANK_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SILENT_FOR_FIELD_NUMBER: _ClassVar[int]
    LAST_LINE_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    local_rank: int
    global_rank: int
    pid: int
    threads: _containers.RepeatedCompositeFieldContainer[ThreadStack]
    error: str
    silent_for: float
    last_line: str
    cpu_percent: float
    def __init__(self, local_rank: _Optional[int] = ..., global_rank: _Optional[int] = ..., pid: _Optional[int] = ..., threads: _Optional[_Iterable[_Union[ThreadStack, _Mapping]]] = ..., error: _Optional[str] = ..., silent_for: _Optional[float] = ..., last_line: _Optional[str] = ..., cpu_percent: _Optional[float] = ...) -> None: ...

class StacksResponse(_message.Message):
    __slots__ = ("job_id", "restart_count", "ranks", "hostname")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    restart_count: int
    ranks: _containers.RepeatedCompositeFieldContainer[RankStacks]
    hostname: str
    def __init__(self, job_id: _Optional[str] = ..., restart_count: _Optional[int] = ..., ranks: _Optional[_Iterable[_Union[RankStacks, _Mapping]]] = ..., hostname: _Optional[str] = ...) -> None: ...
