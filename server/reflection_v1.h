// ReflectionV1Service: server reflection version 1 (grpc.reflection.v1.ServerReflection, see
// proto/grpc/reflection/v1/reflection.proto), beside the v1alpha service of Debian's
// libgrpc++_reflection, which predates v1. Clients that try v1 first (buf curl, newer grpcurl)
// then list and describe the services without a fallback.
//
// Descriptors come from the generated pool (every linked .pb.cc registers its file there), the
// same pool the v1alpha service reads. Each stream answers its requests in order, one response
// per request; a file's imports are sent with it, each file once per stream.
//
// Thread-safety: the service is immutable; each stream's reactor is driven by gRPC one
// operation at a time.
#ifndef SIEVE_SERVER_REFLECTION_V1_H_
#define SIEVE_SERVER_REFLECTION_V1_H_

#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "grpc/reflection/v1/reflection.grpc.pb.h"

namespace sieve::server {

class ReflectionV1Service final : public grpc::reflection::v1::ServerReflection::CallbackService {
 public:
  // `services`: the fully qualified names list_services reports.
  explicit ReflectionV1Service(std::vector<std::string> services)
      : services_(std::move(services)) {}

  grpc::ServerBidiReactor<grpc::reflection::v1::ServerReflectionRequest,
                          grpc::reflection::v1::ServerReflectionResponse>*
  ServerReflectionInfo(grpc::CallbackServerContext* context) override;

 private:
  class Reactor;
  const std::vector<std::string> services_;
};

}  // namespace sieve::server

#endif  // SIEVE_SERVER_REFLECTION_V1_H_
