//! System tests for Starling. They start the real `starling` binary on free loopback ports and
//! talk to it over sockets with independent clients; see `tests/tests/`.
