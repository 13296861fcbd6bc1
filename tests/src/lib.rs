//! `iris-tests`: cross-process integration tests that start real `iris-edge` processes and talk
//! to them over real sockets, as an unchanged v1 client would.
