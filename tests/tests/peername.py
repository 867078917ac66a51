# A TCP server that answers each connection with the address it sees as its peer (getpeername), then closes it;
# for tests/tests/multihost.rs (what a workload sees as its client's address behind the mesh).
#   python3 peername.py HOST PORT
import socket
import sys

host, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
with socket.create_server((host, port), family=family, backlog=64) as server:
    while True:
        conn, _ = server.accept()
        with conn:
            conn.sendall((conn.getpeername()[0] + "\n").encode())
