/* The kernels' threads (rerankd.modeling.fused_attention): a kernel's workers run on the caller's thread
 * and `threads - 1` started here, each taking its share of the units; no pool outlives a call. */
#include <pthread.h>
#include <stddef.h>

enum { MAX_THREADS = 256 };

/* Runs `work` on each of `threads` workers (`workers` holds them, `worker_bytes` apart), the first on this
 * thread, and waits for them all. 0 when every worker ran; nonzero when a thread could not be started (its
 * workers' units then went undone, and the caller computes them another way). */
int run_workers(void *(*work)(void *), void *workers, size_t worker_bytes, int threads) {
    pthread_t ids[MAX_THREADS];
    char *worker = workers;
    int started = 1;
    for (; started < threads; started++)
        if (pthread_create(&ids[started], NULL, work, worker + (size_t)started * worker_bytes) != 0) break;
    work(worker);
    for (int t = 1; t < started; t++) pthread_join(ids[t], NULL);
    return started < threads;
}
