//! Fill the NVRTC disk cache for a GPU architecture without a device:
//! `AUGUR_CACHE=DIR cargo run --release -p augur-cuda --example warm_cache -- 9 0`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<i32> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let [major, minor] = args[..] else { return Err("usage: warm_cache MAJOR MINOR (9 0 for an H100/H200)".into()) };
    augur_cuda::warm_cache(major, minor)?;
    Ok(())
}
