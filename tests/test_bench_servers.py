"""benchmarks/servers.py's port check: a port another server listens on is refused; one whose last server has just
stopped (its closed connections in TIME_WAIT) is free, as uvicorn itself binds it (found on the H100: bench_vllm's
second server could not start on the first one's port)."""

import socket

import pytest

from benchmarks.servers import ServerError, check_port_free


def _listener() -> socket.socket:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    return server


def test_a_port_someone_listens_on_is_refused_with_its_number():
    with _listener() as server:
        port = server.getsockname()[1]
        with pytest.raises(ServerError, match=f"port {port} on 127.0.0.1 is already in use"):
            check_port_free(port)


def test_a_port_left_in_time_wait_by_a_stopped_server_is_free():
    server = _listener()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server's side closes first: its end of the connection stays in TIME_WAIT
    client.close()
    server.close()
    check_port_free(port)
