//! One module per command group.

pub mod containers;
pub mod image;
pub mod services;
