#include "server/reflection_v1.h"

#include <set>

#include <google/protobuf/descriptor.h>
#include <google/protobuf/descriptor.pb.h>

#include "absl/strings/str_cat.h"
#include "server/tsan_handoff.h"

namespace sieve::server {

namespace rv1 = grpc::reflection::v1;
using google::protobuf::Descriptor;
using google::protobuf::DescriptorPool;
using google::protobuf::FieldDescriptor;
using google::protobuf::FileDescriptor;

class ReflectionV1Service::Reactor final
    : public grpc::ServerBidiReactor<rv1::ServerReflectionRequest,
                                     rv1::ServerReflectionResponse> {
 public:
  // Each gRPC operation is started after TsanHandOff and each callback begins with TsanTakeOver
  // (server/tsan_handoff.h).
  Reactor(const std::vector<std::string>& services, grpc_call* call)
      : services_(services), call_(call) {
    TsanHandOff(this);
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    TsanTakeOver(this, call_);
    if (!ok) {  // the client closed its side: done
      TsanHandOff(this);
      Finish(grpc::Status::OK);
      return;
    }
    response_.Clear();
    Answer(request_, &response_);
    TsanHandOff(this);
    StartWrite(&response_);
  }

  void OnWriteDone(bool ok) override {
    TsanTakeOver(this, call_);
    TsanHandOff(this);
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the stream broke"));
      return;
    }
    StartRead(&request_);
  }

  void OnDone() override {
    TsanTakeOver(this, call_);
    delete this;
  }

 private:
  // Error codes are google.rpc.Code values, which equal gRPC's.
  static void Error(grpc::StatusCode code, std::string message, rv1::ServerReflectionResponse* r) {
    r->mutable_error_response()->set_error_code(static_cast<int32_t>(code));
    r->mutable_error_response()->set_error_message(std::move(message));
  }

  // Adds `file` and the imports this stream has not sent yet.
  void AddFile(const FileDescriptor* file, rv1::FileDescriptorResponse* out) {
    if (file == nullptr || !sent_.insert(file->name()).second) return;
    google::protobuf::FileDescriptorProto proto;
    file->CopyTo(&proto);
    proto.SerializeToString(out->add_file_descriptor_proto());
    for (int i = 0; i < file->dependency_count(); ++i) AddFile(file->dependency(i), out);
  }

  void SendFile(const FileDescriptor* file, const std::string& what,
                rv1::ServerReflectionResponse* r) {
    if (file == nullptr) return Error(grpc::StatusCode::NOT_FOUND, what + " not found", r);
    AddFile(file, r->mutable_file_descriptor_response());
  }

  void Answer(const rv1::ServerReflectionRequest& q, rv1::ServerReflectionResponse* r) {
    const DescriptorPool* pool = DescriptorPool::generated_pool();
    r->set_valid_host(q.host());
    *r->mutable_original_request() = q;
    switch (q.message_request_case()) {
      case rv1::ServerReflectionRequest::kFileByFilename:
        return SendFile(pool->FindFileByName(q.file_by_filename()),
                        absl::StrCat("file '", q.file_by_filename(), "'"), r);
      case rv1::ServerReflectionRequest::kFileContainingSymbol:
        return SendFile(pool->FindFileContainingSymbol(q.file_containing_symbol()),
                        absl::StrCat("symbol '", q.file_containing_symbol(), "'"), r);
      case rv1::ServerReflectionRequest::kFileContainingExtension: {
        const rv1::ExtensionRequest& e = q.file_containing_extension();
        const Descriptor* type = pool->FindMessageTypeByName(e.containing_type());
        const FieldDescriptor* ext =
            type ? pool->FindExtensionByNumber(type, e.extension_number()) : nullptr;
        return SendFile(ext ? ext->file() : nullptr,
                        absl::StrCat("extension ", e.extension_number(), " of '",
                                     e.containing_type(), "'"),
                        r);
      }
      case rv1::ServerReflectionRequest::kAllExtensionNumbersOfType: {
        const Descriptor* type = pool->FindMessageTypeByName(q.all_extension_numbers_of_type());
        if (type == nullptr) {
          return Error(grpc::StatusCode::NOT_FOUND,
                       absl::StrCat("type '", q.all_extension_numbers_of_type(), "' not found"),
                       r);
        }
        std::vector<const FieldDescriptor*> extensions;
        pool->FindAllExtensions(type, &extensions);
        rv1::ExtensionNumberResponse* out = r->mutable_all_extension_numbers_response();
        out->set_base_type_name(type->full_name());
        for (const FieldDescriptor* f : extensions) out->add_extension_number(f->number());
        return;
      }
      case rv1::ServerReflectionRequest::kListServices:
        for (const std::string& name : services_) {
          r->mutable_list_services_response()->add_service()->set_name(name);
        }
        return;
      case rv1::ServerReflectionRequest::MESSAGE_REQUEST_NOT_SET:
        return Error(grpc::StatusCode::INVALID_ARGUMENT, "the request names no question", r);
    }
  }

  const std::vector<std::string>& services_;
  grpc_call* const call_;  // for the TSan hand-off only (server/tsan_handoff.h)
  rv1::ServerReflectionRequest request_;
  rv1::ServerReflectionResponse response_;
  std::set<std::string> sent_;  // files this stream has sent
};

grpc::ServerBidiReactor<rv1::ServerReflectionRequest, rv1::ServerReflectionResponse>*
ReflectionV1Service::ServerReflectionInfo(grpc::CallbackServerContext* context) {
  auto* reactor = new Reactor(services_, context->c_call());
  TsanHandOff(reactor);
  return reactor;
}

}  // namespace sieve::server
