//! `peer-client daemon`: the service that runs downloads into the content cache and announces
//! them, the peer port that serves them, upload accounting and the local control API.

pub mod control;
pub mod peer_server;
pub mod service;
pub mod uploads;
