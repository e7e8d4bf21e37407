//! The Sluice control plane.
pub mod api;
pub mod cli;
pub mod live;
pub mod manifests;
pub mod model;
pub mod objects;
pub mod planner;
pub mod policy;
pub mod report;
pub mod selector;
pub mod synthetic;
