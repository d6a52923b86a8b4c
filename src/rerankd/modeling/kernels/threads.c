/* The kernels' threads (rerankd.modeling.fused_attention): a kernel's workers run in an OpenMP team, on the
 * runtime torch's CPU ops use (torch loads its libgomp.so.1 first, and this library binds to the one
 * loaded). Threads of the kernels' own shared the cores with OpenMP's, which spin for a while after each of
 * torch's parallel ops: the dense layer just before a layer's attention kept a core busy under it. */
#include <omp.h>
#include <stddef.h>

/* Runs `work` on each of `count` workers (`workers` holds them, `worker_bytes` apart), spread over an OpenMP
 * team of at most `count` threads (fewer where OpenMP gives fewer: a thread then runs several in turn), and
 * returns when all have run. */
void run_workers(void (*work)(void *), void *workers, size_t worker_bytes, int count) {
#pragma omp parallel num_threads(count)
    for (int w = omp_get_thread_num(); w < count; w += omp_get_num_threads())
        work((char *)workers + (size_t)w * worker_bytes);
}
