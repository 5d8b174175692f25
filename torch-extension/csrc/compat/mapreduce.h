/* Interim copy of the C ABI declarations (DESIGN.md section 3) used only while the repository's
 * generated include/mapreduce.h does not exist yet; setup.py prefers the real header. */
#ifndef MAPREDUCE_H
#define MAPREDUCE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct mr_comm mr_comm;
typedef struct mr_request mr_request;
typedef struct { char internal[256]; } mr_unique_id;

typedef enum { MR_OK = 0, MR_ERR_INVALID_ARGUMENT, MR_ERR_SYSTEM, MR_ERR_TIMEOUT,
               MR_ERR_REMOTE, MR_ERR_AUTH, MR_ERR_ABORTED, MR_ERR_VERIFY,
               MR_ERR_INTERNAL } mr_result;
typedef enum { MR_FLOAT32, MR_FLOAT64, MR_FLOAT16, MR_BFLOAT16,
               MR_INT8, MR_UINT8, MR_INT32, MR_INT64 } mr_dtype;
typedef enum { MR_SUM, MR_AVG, MR_MAX, MR_MIN, MR_PROD } mr_op;

const char *mr_result_string(mr_result r);
const char *mr_last_error(void);

mr_result mr_get_unique_id(mr_unique_id *id);
mr_result mr_comm_init_rank(mr_comm **comm, int nranks, const mr_unique_id *id, int rank);
mr_result mr_comm_init_env(mr_comm **comm);
mr_result mr_comm_rank(const mr_comm *comm, int *rank);
mr_result mr_comm_size(const mr_comm *comm, int *size);
mr_result mr_comm_destroy(mr_comm *comm);
mr_result mr_comm_abort(mr_comm *comm);

mr_result mr_allreduce(mr_comm *c, void *buf, size_t count, mr_dtype t, mr_op op);
mr_result mr_broadcast(mr_comm *c, void *buf, size_t count, mr_dtype t, int root);
mr_result mr_allgather(mr_comm *c, const void *send, void *recv, size_t count, mr_dtype t);
mr_result mr_reduce_scatter(mr_comm *c, const void *send, void *recv, size_t recv_count,
                            mr_dtype t, mr_op op);
mr_result mr_barrier(mr_comm *c);

mr_result mr_iallreduce(mr_comm *c, void *buf, size_t count, mr_dtype t, mr_op op,
                        mr_request **req);
mr_result mr_ibroadcast(mr_comm *c, void *buf, size_t count, mr_dtype t, int root,
                        mr_request **req);
mr_result mr_iallgather(mr_comm *c, const void *send, void *recv, size_t count, mr_dtype t,
                        mr_request **req);
mr_result mr_ireduce_scatter(mr_comm *c, const void *send, void *recv, size_t recv_count,
                             mr_dtype t, mr_op op, mr_request **req);
mr_result mr_ibarrier(mr_comm *c, mr_request **req);
mr_result mr_wait(mr_request *req);
mr_result mr_test(mr_request *req, int *done);

#ifdef __cplusplus
}
#endif

#endif
