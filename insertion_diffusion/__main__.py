from insertion_diffusion.cli import main

if __name__ == "__main__":
    main()
