"""Parsing the buffer sizes llama-server prints at --log-verbosity 4."""

from __future__ import annotations

from corral.probe.usage import buffer_device, parse_buffer_sizes

MiB = 1 << 20

# As printed by llama-server 515e855 (CPU) for SmolLM2 with -np 4 -c 8192, then lines in the
# shape the CUDA build prints for a split model.
CPU_LOG = """\
0.00.214.454 I load_tensors:   CPU_Mapped model buffer size =    92.10 MiB
0.00.218.142 I llama_context:        CPU  output buffer size =     0.75 MiB
0.00.218.418 I llama_kv_cache:        CPU KV buffer size =   180.00 MiB
0.00.426.435 I llama_kv_cache: size =  180.00 MiB (  2048 cells,  30 layers,  4/4 seqs), K (f16)
0.00.435.944 I sched_reserve:        CPU compute buffer size =    16.64 MiB
""".splitlines()

GPU_LOG = """\
load_tensors:        CUDA0 model buffer size =  20285.30 MiB
load_tensors:        CUDA1 model buffer size =  20117.70 MiB
load_tensors:   CPU_Mapped model buffer size =   563.62 MiB
llama_context:  CUDA_Host  output buffer size =     2.45 MiB
llama_kv_cache:      CUDA0 KV buffer size =  3280.00 MiB
llama_kv_cache:      CUDA1 KV buffer size =  3120.00 MiB
llama_memory_recurrent:      CUDA1 RS buffer size =     1.50 MiB
sched_reserve:      CUDA0 compute buffer size =   200.00 MiB
sched_reserve:      CUDA0 compute buffer size =   312.00 MiB
sched_reserve:      CUDA1 compute buffer size =   312.00 MiB
sched_reserve:  CUDA_Host compute buffer size =    32.01 MiB
""".splitlines()


def test_cpu_log() -> None:
    rep = parse_buffer_sizes(CPU_LOG)
    assert set(rep.by_device) == {"cpu"}
    assert rep.get("cpu", "kv_cache") == 180 * MiB
    assert rep.get("cpu", "weights") == round(92.10 * MiB)
    assert rep.component("output") == round(0.75 * MiB)
    assert rep.total() == rep.total("cpu") == sum(rep.by_device["cpu"].values())


def test_gpu_log_maps_child_indices_to_corral_devices() -> None:
    rep = parse_buffer_sizes(GPU_LOG, gpu_ids=["cuda:3", "cuda:5"])
    assert set(rep.by_device) == {"cpu", "cuda:3", "cuda:5"}
    assert rep.get("cuda:3", "kv_cache") == 3280 * MiB
    assert rep.get("cuda:5", "recurrent_state") == round(1.5 * MiB)
    # a compute buffer reserved twice counts once, at its last size
    assert rep.get("cuda:3", "compute") == 312 * MiB
    assert rep.get("cpu", "compute") == round(32.01 * MiB)
    assert rep.get("cpu", "output") == round(2.45 * MiB)


def test_buffer_names() -> None:
    assert buffer_device("CPU_REPACK") == "cpu"
    assert buffer_device("CUDA_Host") == "cpu"
    assert buffer_device("CUDA2") == "cuda:2"
    assert buffer_device("CUDA1", ["cuda:7", "cuda:4"]) == "cuda:4"
    assert buffer_device("Vulkan0") == "vulkan0"


def test_a_draft_models_context_adds_its_own_compute_buffer() -> None:
    # As printed by llama-server 515e855 (CPU), SmolLM2 with itself as the draft (-md): two
    # contexts, each announcing itself and reserving its own compute buffer.
    context = """\
0.00.417.794 I llama_context: n_ctx_seq             = 2048
0.00.417.869 I llama_context:        CPU  output buffer size =     0.38 MiB
0.00.418.042 I llama_kv_cache:        CPU KV buffer size =    90.00 MiB
0.00.522.509 I sched_reserve:        CPU compute buffer size =    16.64 MiB
"""
    log = ("0.00.412.166 I load_tensors:   CPU_Mapped model buffer size =    92.10 MiB\n"
           + context + "0.00.742.868 I load_tensors:   CPU_Mapped model buffer size =    "
           "92.10 MiB\n" + context).splitlines()
    rep = parse_buffer_sizes(log)
    assert rep.get("cpu", "compute") == 2 * round(16.64 * MiB)
    assert rep.get("cpu", "kv_cache") == 180 * MiB
