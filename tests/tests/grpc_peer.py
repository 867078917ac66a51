# A gRPC server and client (the `grpcio` package from PyPI), independent of Trellis, for tests/tests/http.rs.
# Messages are raw bytes (no protobuf): /pkg.Svc/Echo and /pkg.Svc/Forbidden (unary) answer "echo:" + request,
# /pkg.Svc/Chat (bidirectional streaming) answers each message as it arrives.
#   python3 grpc_peer.py server HOST PORT     prints "listening" once it accepts
#   python3 grpc_peer.py client HOST:PORT     calls all three; prints a JSON result
import json
import sys
from concurrent import futures

import grpc

if sys.argv[1] == "server":

    def unary(request, context):
        return b"echo:" + request

    def chat(requests, context):
        for r in requests:
            yield b"echo:" + r

    handler = grpc.method_handlers_generic_handler("pkg.Svc", {
        "Echo": grpc.unary_unary_rpc_method_handler(unary),
        "Forbidden": grpc.unary_unary_rpc_method_handler(unary),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{sys.argv[2]}:{sys.argv[3]}")
    server.start()
    print("listening", flush=True)
    server.wait_for_termination()
else:
    out = {}
    with grpc.insecure_channel(sys.argv[2]) as channel:
        out["unary"] = channel.unary_unary("/pkg.Svc/Echo")(b"hi", timeout=20).decode()
        replies = channel.stream_stream("/pkg.Svc/Chat")(iter([b"a", b"b", b"c"]), timeout=20)
        out["bidi"] = [r.decode() for r in replies]
        try:
            channel.unary_unary("/pkg.Svc/Forbidden")(b"x", timeout=20)
            out["forbidden"] = "OK"
        except grpc.RpcError as e:
            out["forbidden"] = e.code().name
            out["forbiddenDetails"] = e.details()
    print(json.dumps(out))
