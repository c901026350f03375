# sieve_loadgen: a gRPC and HTTP (OpenAI API) load test for the daemon (Poisson arrivals, mixed prompt lengths; reports
# TTFT, inter-token latency and throughput percentiles). Included by bench/CMakeLists.txt when
# the server stack (gRPC, Protobuf) is built. Run it against a running `sieved`:
#   sieve_loadgen --target 127.0.0.1:50051 --rate 2 --duration 60 --prompt-lengths 32,256,1024
find_package(gRPC CONFIG REQUIRED)

add_library(sieve_loadgen_lib STATIC loadgen_lib.cc)
target_include_directories(sieve_loadgen_lib PUBLIC ${PROJECT_SOURCE_DIR})
target_link_libraries(sieve_loadgen_lib
  PUBLIC nlohmann_json::nlohmann_json absl::status absl::statusor absl::strings absl::str_format)

add_executable(sieve_loadgen loadgen.cc)
# cpp-httplib for --protocol http (found by server/CMakeLists.txt, GLOBAL).
target_link_libraries(sieve_loadgen PRIVATE sieve_loadgen_lib sieve_proto gRPC::grpc++
                                            PkgConfig::HTTPLIB)

sieve_test(bench_loadgen_lib_test SOURCES loadgen_lib_test.cc LIBS sieve_loadgen_lib LABELS bench)
