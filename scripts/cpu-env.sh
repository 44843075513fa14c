# Environment for running SGLang and Triton on this CPU machine (sourced by the scripts and CI).
export SGLANG_USE_CPU_ENGINE=1        # SGLang's in-tree CPU platform (gloo, psutil memory)
export TRITON_INTERPRET=1             # Triton kernels run in the interpreter (no GPU here)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # stable timings on 2 cores (see design notes)
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export PYTHONUNBUFFERED=1
