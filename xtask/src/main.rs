mod validate;
fn main() -> anyhow::Result<()> {
    validate::run(std::path::Path::new("."))
}
