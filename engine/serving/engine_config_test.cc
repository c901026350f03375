#include "engine/serving/engine_config.h"

#include <string>

#include "engine/runner/model_runner.h"
#include "engine/serving/scheduler.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace sieve::engine {
namespace {

using ::testing::HasSubstr;

std::string Problems(const EngineConfig& c) {
  absl::Status s = c.Validate();
  if (s.ok()) return "";
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  return std::string(s.message());
}

TEST(EngineConfigTest, DefaultsAreValid) {
  EXPECT_EQ(Problems(EngineConfig()), "");
  EXPECT_EQ(EngineConfig().attention.Describe(), "prefill=dense decode=dense");
}

TEST(EngineConfigTest, PrefillAttentionSettingsNameTheirKeys) {
  EngineConfig c;
  c.attention.prefill.method = "sparse";
  c.attention.prefill.sparse_min_tokens = -1;
  c.attention.prefill.dense_layers = -2;
  c.attention.prefill.xattention.stride = 5;
  c.attention.prefill.xattention.block_size = 12;
  c.attention.prefill.xattention.threshold = 3;
  const std::string p = Problems(c);
  EXPECT_THAT(p, HasSubstr("attention.prefill.method must be one of: dense, minference, xattention"));
  EXPECT_THAT(p, HasSubstr("got 'sparse'"));
  EXPECT_THAT(p, HasSubstr("attention.prefill.sparse_min_tokens must be at least 0, got -1"));
  EXPECT_THAT(p, HasSubstr("attention.prefill.dense_layers must be at least 0, got -2"));
  EXPECT_THAT(p, HasSubstr("attention.prefill.xattention.stride must be 4, 8 or 16, got 5"));
  EXPECT_THAT(p, HasSubstr("attention.prefill.xattention.block_size must be in [16, 1024] and a "
                           "multiple of attention.prefill.xattention.stride (5), got 12"));
  EXPECT_THAT(p, HasSubstr("attention.prefill.xattention.threshold must be in [-1, 2]"));
}

TEST(EngineConfigTest, DecodeAttentionSettingsNameTheirKeysAndDescribeThemselves) {
  EngineConfig c;
  c.attention.decode.method = "quest";
  c.attention.decode.sparse_min_tokens = -1;
  c.attention.decode.dense_layers = -2;
  c.attention.decode.token_budget = 0;
  const std::string p = Problems(c);
  EXPECT_THAT(p, HasSubstr("attention.decode.sparse_min_tokens must be at least 0, got -1"));
  EXPECT_THAT(p, HasSubstr("attention.decode.dense_layers must be at least 0, got -2"));
  EXPECT_THAT(p, HasSubstr("attention.decode.token_budget must be at least 1, got 0"));
  // The page-size rule of quest (two pages of 16 tokens by default).
  EXPECT_THAT(p, HasSubstr("attention.decode.token_budget must be at least two KV pages (32 "
                           "tokens) for quest, got 0"));
  c = EngineConfig();
  c.attention.decode.method = "quest";
  c.attention.decode.token_budget = 2048;
  c.attention.decode.quest.per_kv_head = true;
  EXPECT_EQ(Problems(c), "");
  EXPECT_EQ(c.attention.Describe(),
            "prefill=dense decode=quest(budget=2048,min_tokens=4096,dense_layers=2,"
            "per_kv_head=1)");
  c.attention.decode.method = "double_sparsity";
  c.attention.decode.double_sparsity.label_bits = 4;
  EXPECT_EQ(c.attention.Describe(),
            "prefill=dense decode=double_sparsity(budget=2048,channels=16,label_bits=4,"
            "per_kv_head=0,calibration=startup,min_tokens=4096,dense_layers=2)");
  c.model.backend = "cuda";
  EXPECT_EQ(Problems(c), "");  // DoubleSparsity runs on cuda
  c.attention.decode.method = "quest";  // and Quest
  EXPECT_EQ(Problems(c), "");
  // XAttention prefill too, with the kernel's 128-query blocks; MInference too.
  c.attention.prefill.method = "xattention";
  EXPECT_EQ(Problems(c), "");
  c.attention.prefill.xattention.block_size = 64;
  EXPECT_THAT(Problems(c), HasSubstr("attention.prefill.xattention.block_size must be 128 on the "
                                     "cuda backend"));
  c.attention.prefill.method = "minference";
  EXPECT_EQ(Problems(c), "");
}

TEST(EngineConfigTest, DtypeMustBeWhatTheBackendComputesIn) {
  EngineConfig c;
  c.model.dtype = "bfloat16";
  EXPECT_THAT(Problems(c), HasSubstr("model.dtype bfloat16 is not what the cpu backend computes "
                                     "in (float32)"));
  c.model.dtype = "float32";
  EXPECT_EQ(Problems(c), "");
  c.model.backend = "cuda";
  EXPECT_THAT(Problems(c), HasSubstr("model.dtype float32 is not what the cuda backend computes "
                                     "in (bfloat16)"));
  c.model.dtype = "bfloat16";
  EXPECT_EQ(Problems(c), "");
  c.model.dtype = "auto";
  EXPECT_EQ(Problems(c), "");
  c.model.dtype = "float16";
  EXPECT_THAT(Problems(c), HasSubstr("model.dtype must be one of: auto, float32, bfloat16"));
}

// kv_cache.dtype: auto resolves to the backend's compute dtype; cpu takes float32 and bfloat16
// (with every prefill method), cuda bfloat16 only; the runner gets it.
TEST(EngineConfigTest, KvCacheDtypeIsCheckedPerBackendAndReachesTheRunner) {
  EngineConfig c;
  EXPECT_EQ(c.kv_cache.dtype, "auto");
  EXPECT_EQ(RunnerOptionsFor(c).kv_dtype, "float32");
  c.kv_cache.dtype = "bfloat16";
  EXPECT_EQ(Problems(c), "");
  EXPECT_EQ(RunnerOptionsFor(c).kv_dtype, "bfloat16");
  c.kv_cache.dtype = "float32";
  EXPECT_EQ(Problems(c), "");
  EXPECT_EQ(RunnerOptionsFor(c).kv_dtype, "float32");
  c.kv_cache.dtype = "float16";
  EXPECT_THAT(Problems(c), HasSubstr("kv_cache.dtype must be one of: auto, float32, bfloat16, "
                                     "got 'float16'"));
  c.kv_cache.dtype = "bfloat16";
  for (const std::string method : {"minference", "xattention"}) {
    c.attention.prefill.method = method;  // the estimators read bfloat16 keys
    EXPECT_EQ(Problems(c), "");
  }
  c.kv_cache.dtype = "auto";
  EXPECT_EQ(Problems(c), "");
  c.attention.prefill.method = "dense";
  c.attention.decode.method = "quest";
  c.kv_cache.dtype = "bfloat16";
  EXPECT_EQ(Problems(c), "");  // Quest's page bounds read the bf16 keys
  c.attention.decode.method = "dense";
  c.model.backend = "cuda";
  EXPECT_EQ(RunnerOptionsFor(c).kv_dtype, "bfloat16");
  EXPECT_EQ(Problems(c), "");
  c.kv_cache.dtype = "auto";
  EXPECT_EQ(RunnerOptionsFor(c).kv_dtype, "bfloat16");
  c.kv_cache.dtype = "float32";
  EXPECT_THAT(Problems(c), HasSubstr("kv_cache.dtype float32 is not available on the cuda "
                                     "backend (its KV cache is bfloat16)"));
}

TEST(EngineConfigTest, OneCudaDeviceAndNoneOnCpu) {
  EngineConfig c;
  c.model.devices = {0};
  EXPECT_THAT(Problems(c), HasSubstr("model.devices must be empty with model.backend cpu, got "
                                     "[0]"));
  c.model.backend = "cuda";
  EXPECT_EQ(Problems(c), "");
  c.model.devices = {3};
  EXPECT_EQ(Problems(c), "");
  EXPECT_EQ(RunnerOptionsFor(c).device, 3);
  c.model.devices = {0, 1};
  EXPECT_THAT(Problems(c), HasSubstr("model.devices lists 2 devices [0, 1]; the cuda backend "
                                     "serves on one device"));
  c.model.devices = {};
  EXPECT_EQ(RunnerOptionsFor(c).device, 0);
}

TEST(EngineConfigTest, AttentionKernelReachesTheRunnerAndIsAutoOnlyOnCpu) {
  EngineConfig c;
  EXPECT_EQ(RunnerOptionsFor(c).attention_kernel, "auto");
  c.attention.kernel = "simple";
  EXPECT_THAT(Problems(c), HasSubstr("attention.kernel simple is not available on cpu"));
  c.model.backend = "cuda";
  EXPECT_EQ(Problems(c), "");
  EXPECT_EQ(RunnerOptionsFor(c).attention_kernel, "simple");
  c.attention.kernel = "fastest";
  EXPECT_THAT(Problems(c), HasSubstr("attention.kernel"));
}

TEST(EngineConfigTest, ChecksChoicesRangesAndCrossFieldRules) {
  EngineConfig c;
  c.attention.prefill.method = "flexprefill";
  c.attention.decode.method = "h2o";
  c.pools.decode_priority = "urgent";
  c.pools.decode_workers = 0;
  c.scheduler.prefill_chunk_tokens = 4096;
  c.kv_cache.page_size_tokens = 24;
  const std::string p = Problems(c);
  EXPECT_THAT(p, HasSubstr("attention.prefill.method must be one of: dense, minference, xattention, got 'flexprefill'"));
  EXPECT_THAT(p, HasSubstr("attention.decode.method must be one of: dense, quest, "
                           "double_sparsity, got 'h2o'"));
  EXPECT_THAT(p, HasSubstr("pools.decode_priority must be one of: high, normal, got 'urgent'"));
  EXPECT_THAT(p, HasSubstr("pools.decode_workers must be at least 1, got 0"));
  EXPECT_THAT(p, HasSubstr("scheduler.prefill_chunk_tokens (4096) must not exceed "
                           "scheduler.max_batch_tokens (2048)"));
  EXPECT_THAT(p, HasSubstr("kv_cache.page_size_tokens must be a power of two, got 24"));

  c = EngineConfig();
  c.model.max_context_tokens = 4096;
  c.kv_cache.num_pages = 10;
  c.scheduler.max_queued_tokens = 100;
  EXPECT_THAT(Problems(c), HasSubstr("kv_cache.num_pages * kv_cache.page_size_tokens (160 tokens) "
                                     "must hold one full context"));
  EXPECT_THAT(Problems(c), HasSubstr("scheduler.max_queued_tokens (100) must be at least "
                                     "model.max_context_tokens (4096)"));
  c.kv_cache.num_pages = 0;  // derived: no check before the model is loaded
  c.scheduler.max_queued_tokens = 4096;
  EXPECT_EQ(Problems(c), "");
}

// Every field of the runner's and the scheduler's options comes from the tree.
TEST(EngineConfigTest, DerivesTheOptionsOfThePartsFromTheTree) {
  EngineConfig c;
  c.model.backend = "cuda";
  c.model.devices = {2};
  c.model.weights = "random";
  c.model.random_seed = 9;
  c.model.cpu_threads = 3;
  c.model.cuda_graphs = false;
  c.model.max_context_tokens = 5000;
  c.kv_cache.page_size_tokens = 32;
  c.kv_cache.num_pages = 777;
  c.kv_cache.memory_fraction = 0.5;
  c.scheduler.max_batch_tokens = 3000;
  c.scheduler.prefill_chunk_tokens = 300;
  c.scheduler.max_running_requests = 48;
  c.scheduler.enable_prefix_caching = false;
  c.pools.prefill_workers = 2;
  c.pools.decode_workers = 3;
  const ModelRunnerOptions r = RunnerOptionsFor(c);
  EXPECT_EQ(r.backend, "cuda");
  EXPECT_EQ(r.device, 2);
  EXPECT_EQ(r.weights, "random");
  EXPECT_EQ(r.random_seed, 9u);
  EXPECT_EQ(r.num_threads, 3);
  EXPECT_FALSE(r.cuda_graphs);
  EXPECT_EQ(r.page_size, 32);
  EXPECT_EQ(r.num_pages, 777);
  EXPECT_DOUBLE_EQ(r.kv_memory_fraction, 0.5);
  EXPECT_EQ(r.kv_max_sequences, 48);
  EXPECT_EQ(r.kv_max_context_tokens, 5000);
  EXPECT_EQ(r.max_step_tokens, 3000);
  EXPECT_EQ(r.max_step_logits, 48);

  const SchedulerOptions s = SchedulerOptionsFor(c, 555);
  EXPECT_EQ(s.page_size, 32);
  EXPECT_EQ(s.num_pages, 555);
  EXPECT_EQ(s.max_batch_tokens, 3000);
  EXPECT_EQ(s.prefill_chunk_tokens, 300);
  EXPECT_EQ(s.max_running_requests, 48);
  EXPECT_EQ(s.prefill_workers, 2);
  EXPECT_EQ(s.decode_workers, 3);
  EXPECT_EQ(s.max_worker_tokens, 3000);
  EXPECT_EQ(s.max_worker_sequences, 48);
  EXPECT_FALSE(s.enable_prefix_caching);
  EXPECT_TRUE(s.Validate().ok());
}

TEST(EngineConfigTest, DoubleSparsitySettings) {
  EngineConfig c;
  c.attention.decode.method = "double_sparsity";
  EXPECT_EQ(Problems(c), "");
  EXPECT_EQ(RunnerOptionsFor(c).ds_label_channels, 16);
  c.attention.decode.double_sparsity.label_bits = 8;
  c.attention.decode.double_sparsity.statistic = "v";
  c.attention.decode.double_sparsity.channels = 0;
  const std::string p = Problems(c);
  EXPECT_THAT(p, HasSubstr("attention.decode.double_sparsity.label_bits must be 16 or 4, got 8"));
  EXPECT_THAT(p, HasSubstr("attention.decode.double_sparsity.statistic must be qk, q or k"));
  EXPECT_THAT(p, HasSubstr("attention.decode.double_sparsity.channels must be at least 1"));
  c = EngineConfig();
  c.attention.decode.double_sparsity.per_kv_head = true;
  EXPECT_EQ(RunnerOptionsFor(c).ds_label_channels, 0);  // not the decode method: no labels
}

}  // namespace
}  // namespace sieve::engine
