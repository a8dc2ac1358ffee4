//! `sqlx::migrate!` embeds the SQL files under migrations/ at compile time; without this, a new
//! or edited migration would not be picked up until something else changed.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
