//! Peering state for peer-clients: the tracker of which peers hold which pieces.

pub mod tracker;
